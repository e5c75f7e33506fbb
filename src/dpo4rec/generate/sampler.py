"""Greedy + N sampled answers per prompt, batched, behind one interface.

Backends:
* ``fast``: our shared-prefix decoder for Llama-family models (fast_llama.py);
* ``hf``: ``model.generate`` with ``num_return_sequences`` (any causal LM);
* ``auto``: ``fast`` where the architecture allows, else ``hf``.
(vLLM lives in vllm_backend.py and is loaded only when asked for.)

Reproducibility: batches are planned from the prompt lengths alone and each
batch draws from a generator seeded by (seed, batch number), so a rerun, or a
resumed run that skips finished batches, produces the same texts (on one
device type: the generator lives on the model's device, and CUDA draws other
numbers than the CPU). Every tensor a sampler makes lives on the model's
device too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dpo4rec.generate.fast_llama import DecodeState, FastLlama, supports


@dataclass
class SamplerSettings:
    n_samples: int = 10
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 64
    greedy: bool = True
    """Also write one greedy answer per prompt (sample 0): test-time knowledge."""
    seed: int = 0

    @property
    def rows_per_prompt(self) -> int:
        return self.n_samples + int(self.greedy)


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens)


def plan_batches(lengths: list[int], rows_per_prompt: int, max_rows: int, max_prefill_tokens: int) -> list[list[int]]:
    """Group prompt indices into batches, longest prompts first.

    Sorting by length keeps left padding small; the caps bound the decode
    batch (rows) and the prefill's memory (users x longest prompt).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and ((len(current) + 1) * rows_per_prompt > max_rows or (len(current) + 1) * longest > max_prefill_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def batch_generator(seed: int, batch_number: int, device: str | torch.device = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.SeedSequence([seed, batch_number]).generate_state(1)[0]))
    return generator


def pad(prompts: list[list[int]], pad_id: int, left: bool = True, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(U, P)`` and attention mask, padded on the left (for generate) or right, built on the CPU and
    moved to ``device`` in one copy each."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        span = slice(width - len(prompt), width) if left else slice(0, len(prompt))
        ids[row, span] = torch.tensor(prompt, dtype=torch.long)
        mask[row, span] = 1
    return ids.to(device), mask.to(device)


def top_p_sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row of ``logits (R, V)`` by nucleus sampling, exact, without sorting the vocabulary.

    The nucleus is the head of the row sorted by probability (ties in index
    order) whose preceding mass is below ``top_p``. Rather than sorting 49k
    logits per row (or taking ever larger top-k's, which a 135M model's flat
    distributions at temperature 1 often need), each row draws a token from
    the full distribution by its cumulative sum and keeps it if the mass
    ranked above it is below ``top_p``, else draws again: a rejection sampler
    of the full distribution conditioned on the nucleus, which is the nucleus
    distribution. A draw is kept with probability >= ``top_p``, so rows need
    ~1.1 draws at 0.9. Probabilities are fp32 whatever the logits' dtype.
    """
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    probs = torch.softmax(scaled, dim=-1)  # (R, V)
    tokens = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    rows = torch.arange(probs.shape[0], device=probs.device)
    while len(rows):
        part = probs if len(rows) == probs.shape[0] else probs[rows]
        cdf = part.cumsum(-1)
        u = (1.0 - torch.rand(len(rows), 1, generator=generator, device=probs.device, dtype=cdf.dtype)) * cdf[:, -1:]  # in (0, total]
        pick = torch.searchsorted(cdf, u).clamp_(max=part.shape[1] - 1)  # (rows, 1)
        kept = _in_nucleus(part, pick, top_p)
        tokens[rows[kept]] = pick[kept, 0]
        rows = rows[~kept]
    return tokens


def _in_nucleus(probs: torch.Tensor, pick: torch.Tensor, top_p: float) -> torch.Tensor:
    """Whether each row's token ``pick (rows, 1)`` lies in the row's nucleus (mass ranked above it < top_p).

    One pass decides almost every row: if the mass at or above the token's probability, less its own, is
    below top_p, the token is in whatever the order among ties. Only the rows left over (tokens at or
    near the nucleus' edge, or outside it) need the strict mass above, and those that tie with the edge
    the index order of the ties.
    """
    if top_p >= 1.0:
        return torch.ones(len(probs), dtype=torch.bool, device=probs.device)
    p = probs.gather(1, pick)  # (rows, 1)
    at_or_above = torch.where(probs >= p, probs, 0.0).sum(-1) - p[:, 0]
    kept = at_or_above < top_p
    unsure = (~kept).nonzero(as_tuple=True)[0]
    if len(unsure):
        part, p_u, pick_u = probs[unsure], p[unsure], pick[unsure]
        index = torch.arange(part.shape[1], device=part.device)
        before = (part > p_u) | ((part == p_u) & (index < pick_u))
        kept[unsure] = torch.where(before, part, 0.0).sum(-1) < top_p
    return kept


def _pick(logits: torch.Tensor, settings: SamplerSettings, generator) -> torch.Tensor:
    """Next tokens for logits (U, n, V): row 0 greedy if asked, the rest sampled."""
    U, n, V = logits.shape
    tokens = torch.empty((U, n), dtype=torch.long, device=logits.device)
    first = 0
    if settings.greedy:
        tokens[:, 0] = logits[:, 0].argmax(-1)
        first = 1
    if n > first:
        sampled = top_p_sample(logits[:, first:].reshape(-1, V), settings.temperature, settings.top_p, generator)
        tokens[:, first:] = sampled.view(U, n - first)
    return tokens


class FastSampler:
    """Shared-prefix sampling for Llama-family models."""

    name = "fast"

    def __init__(self, model, eos_ids: list[int], pad_id: int):
        self.fast = FastLlama(model)
        self.device = next(model.parameters()).device
        self.eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=self.device)
        self.pad_id = pad_id

    def sample(self, prompts: list[list[int]], settings: SamplerSettings, generator) -> list[list[Completion]]:
        U, n, T = len(prompts), settings.rows_per_prompt, settings.max_new_tokens
        ids, mask = pad(prompts, self.pad_id, left=False, device=self.device)
        lengths = mask.sum(-1)  # (U,) real prompt lengths: the next position
        keys, values, first_logits = self.fast.prefill(ids, lengths)
        state = DecodeState(keys, values, lengths, n, T)
        out = torch.full((U, n, T), self.pad_id, dtype=torch.long, device=self.device)
        produced = torch.full((U, n), T, dtype=torch.long, device=self.device)  # tokens before EOS
        stopped = torch.zeros((U, n), dtype=torch.bool, device=self.device)
        alive = torch.arange(U, device=self.device)  # original user of each batch slot
        logits = first_logits[:, None, :].expand(U, n, -1)
        for t in range(T):
            tokens = _pick(logits, settings, generator)
            done = stopped[alive]
            tokens = torch.where(done, torch.full_like(tokens, self.pad_id), tokens)
            out[alive, :, t] = tokens
            hit = torch.isin(tokens, self.eos) & ~done  # recorded without asking the host whether any row hit
            produced[alive] = torch.where(hit, t, produced[alive])
            stopped[alive] = done | hit
            # the one host synchronisation per step: how many users have finished (to stop, or to drop them)
            finished_users = stopped[alive].all(-1)
            n_finished = int(finished_users.sum())
            if t == T - 1 or n_finished == len(alive):
                break
            if n_finished >= max(1, len(alive) // 4):
                keep = (~finished_users).nonzero(as_tuple=True)[0]
                state.keep(keep)
                alive, tokens = alive[keep], tokens[keep]
            state.step = t
            positions = (lengths[alive] + t)[:, None].expand(-1, n)
            logits = self.fast.decode_step(tokens, positions, state)
        out, produced, stopped = out.cpu(), produced.cpu(), stopped.cpu()  # one copy back, not one per text
        return [
            [Completion(out[u, r, : produced[u, r]].tolist(), "stop" if stopped[u, r] else "length") for r in range(n)]
            for u in range(U)
        ]


class HFSampler:
    """``model.generate`` with ``num_return_sequences``: any causal LM, prompt copied per sample."""

    name = "hf"

    def __init__(self, model, eos_ids: list[int], pad_id: int):
        self.model = model
        self.device = next(model.parameters()).device
        self.eos_ids = sorted(set(eos_ids))
        self.pad_id = pad_id

    @torch.inference_mode()
    def sample(self, prompts: list[list[int]], settings: SamplerSettings, generator) -> list[list[Completion]]:
        ids, mask = pad(prompts, self.pad_id, left=True, device=self.device)
        common = dict(attention_mask=mask, max_new_tokens=settings.max_new_tokens, eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        results: list[list[Completion]] = [[] for _ in prompts]
        if settings.greedy:
            greedy = self.model.generate(ids, do_sample=False, **common)
            for u in range(len(prompts)):
                results[u].append(self._completion(greedy[u, ids.shape[1]:], settings))
        if settings.n_samples:
            # generate() draws from the global RNG: seed it from this batch's generator
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device)))
            sampled = self.model.generate(
                ids, do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0,
                num_return_sequences=settings.n_samples, **common,
            )
            for row in range(sampled.shape[0]):
                results[row // settings.n_samples].append(self._completion(sampled[row, ids.shape[1]:], settings))
        return results

    def _completion(self, new_tokens: torch.Tensor, settings: SamplerSettings) -> Completion:
        tokens = new_tokens.tolist()
        for position, token in enumerate(tokens):
            if token in self.eos_ids:
                return Completion(tokens[:position], "stop")
        return Completion(tokens, "length")


def make_sampler(backend: str, model, eos_ids: list[int], pad_id: int):
    """The sampler for ``backend`` (auto, fast, hf) over a loaded model (vLLM, which loads its own: vllm_backend.py)."""
    from dpo4rec.errors import InputError

    if backend == "fast" and not supports(model):
        raise InputError(f"generate.backend=fast does not support model type {model.config.model_type!r}; use auto or hf")
    if backend in ("auto", "fast") and supports(model):
        return FastSampler(model, eos_ids, pad_id)
    if backend in ("auto", "hf"):
        return HFSampler(model, eos_ids, pad_id)
    raise InputError(f"generate.backend must be auto, fast or hf here, got {backend!r}")
