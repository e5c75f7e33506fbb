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

TOP_K_STAGES = (64, 512, 4096)  # top-p looks at the top 64, 512, 4,096 logits, then sorts the whole row


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
    """One token per row of ``logits (R, V)`` by nucleus sampling, exact, mostly without a full sort.

    Each row is tried on its top 64 logits, then 512, then 4,096, and sorted in
    full only if the nucleus reaches past those: at temperature 1 a 135M
    model's next-token distribution is often flat enough that 64 do not hold
    90% of the mass, and a full sort of 49k logits per row costs more than
    the decode step itself. Works on the logits' own dtype (bf16 halves the
    memory traffic); candidate probabilities are fp32.
    """
    scaled = logits if temperature == 1.0 else logits / temperature
    log_norm = torch.logsumexp(scaled, dim=-1, keepdim=True).float()  # (R, 1)
    tokens = torch.empty(scaled.shape[0], dtype=torch.long, device=scaled.device)
    rows = torch.arange(scaled.shape[0], device=scaled.device)
    for k in (*TOP_K_STAGES, scaled.shape[-1]):
        part = scaled if len(rows) == scaled.shape[0] else scaled[rows]
        if k >= scaled.shape[-1]:
            values, index = part.float().sort(dim=-1, descending=True)
        else:
            values, index = part.topk(k, dim=-1)
        probs = torch.exp(values.float() - log_norm[rows])
        done = probs.sum(-1) >= top_p if k < scaled.shape[-1] else torch.ones(len(rows), dtype=torch.bool, device=rows.device)
        if done.any():
            tokens[rows[done]] = _nucleus(probs[done], index[done], top_p, generator)
        rows = rows[~done]
        if len(rows) == 0:
            break
    return tokens


def _nucleus(probs: torch.Tensor, index: torch.Tensor, top_p: float, generator) -> torch.Tensor:
    """Sample from the smallest head of descending ``probs`` whose mass reaches ``top_p``."""
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each token
    kept = torch.where(before < top_p, probs, torch.zeros_like(probs))
    choice = torch.multinomial(kept, 1, generator=generator)
    return index.gather(-1, choice).squeeze(-1)


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
