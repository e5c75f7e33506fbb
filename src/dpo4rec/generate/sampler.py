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
import torch.nn.functional as F

from dpo4rec.generate import cpu_kernels
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
    prefill_chunk_tokens: int = 16384
    """Padded prompt tokens per prefill call (the fast sampler): the batch is decoded together all the same."""

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


BLOCK = 256  # the inverse CDF looks up a block of the vocabulary, then a token inside it: two short cumulative sums


class NucleusBuffers:
    """Two (rows, V) fp32 buffers kept across one batch's decoding steps.

    Fresh 30-50 MB tensors at every step cost the kernel's page faults: on a 2-core CPU, half of the
    sampling step's time. Steps with fewer rows (users finished) use the buffers' first rows.
    """

    def __init__(self):
        self.weights = self.scratch = None

    def get(self, rows: int, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.weights is None or self.weights.shape[0] < rows or self.weights.shape[1] != vocab or self.weights.device != device:
            self.weights = torch.empty(rows, vocab, dtype=torch.float32, device=device)
            self.scratch = torch.empty_like(self.weights)
        return self.weights[:rows], self.scratch[:rows]


def top_p_sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator,
                 buffers: NucleusBuffers | None = None) -> torch.Tensor:
    """One token per row of ``logits (..., V)`` (flattened to R rows) by nucleus sampling, exact, without sorting the vocabulary.

    The nucleus is the head of the row sorted by probability (ties in index
    order) whose preceding mass is below ``top_p``. Rather than sorting 49k
    logits per row (or taking ever larger top-k's, which a 135M model's flat
    distributions at temperature 1 often need), each row draws a token from
    the full distribution by inverse CDF and keeps it if the mass ranked above
    it is below ``top_p``, else draws again: a rejection sampler of the full
    distribution conditioned on the nucleus, which is the nucleus
    distribution. A draw is kept with probability >= ``top_p``, so rows need
    ~1.1 draws at 0.9. Weights are fp32 whatever the logits' dtype, and left
    unnormalized (exp(logit - max)): every test compares masses to ``top_p``
    times the row's total.
    """
    V = logits.shape[-1]
    rows_n = logits.numel() // V
    weights, scratch = (buffers or NucleusBuffers()).get(rows_n, V, logits.device)
    ops = _fused_ops(logits)
    if ops is not None:  # each row in one pass (cpu_kernels: ~2.5x less time at 160 x 49k)
        blocks = ops.nucleus_weights(logits if logits.dim() == 3 else logits[None], temperature, weights, BLOCK)
    else:
        weights.view(logits.shape).copy_(logits)  # strided or expanded logits are read in place, not copied first
        if temperature != 1.0:
            weights.div_(temperature)
        weights.sub_(weights.amax(-1, keepdim=True)).exp_()
        blocks = _block_sums(weights)  # (R, blocks)
    block_cdf = blocks.cumsum(-1)
    total = block_cdf[:, -1:]
    tokens = torch.empty(rows_n, dtype=torch.long, device=logits.device)
    rows = torch.arange(rows_n, device=logits.device)
    while len(rows):
        every = len(rows) == rows_n
        part = weights if every else weights[rows]
        cdf, mass = (block_cdf, total) if every else (block_cdf[rows], total[rows])
        u = (1.0 - torch.rand(len(rows), 1, generator=generator, device=part.device, dtype=part.dtype)) * mass  # (0, total]
        pick = _inverse_cdf(part, cdf, u)
        kept = _in_nucleus(part, pick, top_p, mass, scratch[: len(rows)])
        tokens[rows[kept]] = pick[kept, 0]
        rows = rows[~kept]
    return tokens


def _fused_ops(logits: torch.Tensor):
    """cpu_kernels' compiled module where its sampling passes can read ``logits`` (a CPU's fp32 or bf16 rows of two or
    three dims, the vocabulary contiguous), else None."""
    if (logits.device.type != "cpu" or logits.dtype not in (torch.float32, torch.bfloat16) or logits.dim() not in (2, 3)
            or logits.stride(-1) != 1):
        return None
    return cpu_kernels.compiled()


def _block_sums(weights: torch.Tensor) -> torch.Tensor:
    """Each row's mass per block of BLOCK tokens (the last block may be shorter)."""
    R, V = weights.shape
    full = V // BLOCK * BLOCK
    sums = weights[:, :full].view(R, -1, BLOCK).sum(-1)
    return sums if full == V else torch.cat([sums, weights[:, full:].sum(-1, keepdim=True)], dim=1)


def _inverse_cdf(weights: torch.Tensor, block_cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The first token (rows, 1) whose cumulative weight reaches ``u``: the block first, then inside it."""
    V = weights.shape[1]
    block = torch.searchsorted(block_cdf, u).clamp_(max=block_cdf.shape[1] - 1)  # (rows, 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp_(min=0)), 0.0)
    index = block * BLOCK + torch.arange(BLOCK, device=weights.device)  # (rows, BLOCK)
    inside = weights.gather(1, index.clamp(max=V - 1)).masked_fill_(index >= V, 0.0).cumsum(-1)
    # rounding can leave the block's own sum a hair below the block CDF's step: stop at its last token with weight
    rest = torch.minimum(u - before, inside[:, -1:])
    return block * BLOCK + torch.searchsorted(inside, rest).clamp_(max=BLOCK - 1)


def _in_nucleus(weights: torch.Tensor, pick: torch.Tensor, top_p: float, total: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Whether each row's token ``pick (rows, 1)`` lies in the row's nucleus: mass ranked above it < top_p x total.

    Two cheap passes decide almost every row; each is a division by the token's weight and a threshold
    (a comparison that builds a mask runs ~8x slower on CPUs): the mass at or above the token's weight,
    less its own, below the limit keeps the token whatever the order among ties; the mass strictly above
    it at or over the limit rejects it. Rows within a rounding margin of the limit, and rows whose ties
    straddle it, are decided exactly, ties in index order.
    """
    if top_p >= 1.0:
        return torch.ones(len(weights), dtype=torch.bool, device=weights.device)
    limit = top_p * total  # (rows, 1)
    p = weights.gather(1, pick)  # (rows, 1), > 0: zero-weight tokens are never drawn
    margin = 1e-4 * limit[:, 0]
    at_or_above = _mass_from(weights, p, scratch, strict=False) - p[:, 0]
    kept = at_or_above < limit[:, 0] - margin
    normal = p[:, 0] >= torch.finfo(p.dtype).tiny  # the ratio test's exactness needs a normal float
    kept &= normal
    decided = kept.clone()
    left = (~kept).nonzero(as_tuple=True)[0]
    if len(left):
        above = _mass_from(weights[left], p[left], scratch[: len(left)], strict=True)
        decided[left] = (above >= limit[left, 0] + margin[left]) & normal[left]
    unsure = (~decided).nonzero(as_tuple=True)[0]
    if len(unsure):
        part, p_u, pick_u = weights[unsure], p[unsure], pick[unsure]
        index = torch.arange(part.shape[1], device=part.device)
        before = (part > p_u) | ((part == p_u) & (index < pick_u))
        kept[unsure] = torch.where(before, part, 0.0).sum(-1) < limit[unsure, 0]
    return kept


_BELOW_ONE = float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))


def _mass_from(weights: torch.Tensor, p: torch.Tensor, scratch: torch.Tensor, strict: bool) -> torch.Tensor:
    """Per row, the total weight of tokens with weight >= p (or > p when ``strict``).

    w / p is monotone in w and rounds to exactly 1 only for w == p (p normal), so thresholding the ratio
    at 1 (strict) or just below 1 selects the same tokens as comparing w with p; the sum of the kept
    ratios times p is the mass, to fp32 rounding (the callers' margin covers it). Where cpu_kernels runs, one pass
    compares each weight with p.
    """
    ops = _fused_ops(weights)
    if ops is not None:
        return ops.mass_from(weights, p.contiguous(), strict)
    torch.div(weights, p, out=scratch)
    F.threshold_(scratch, 1.0 if strict else _BELOW_ONE, 0.0)
    return scratch.sum(-1) * p[:, 0]


def _pick(logits: torch.Tensor, settings: SamplerSettings, generator, buffers: NucleusBuffers | None = None) -> torch.Tensor:
    """Next tokens for logits (U, n, V): row 0 greedy if asked, the rest sampled."""
    U, n, V = logits.shape
    tokens = torch.empty((U, n), dtype=torch.long, device=logits.device)
    first = 0
    if settings.greedy:
        tokens[:, 0] = logits[:, 0].argmax(-1)
        first = 1
    if n > first:
        sampled = top_p_sample(logits[:, first:], settings.temperature, settings.top_p, generator, buffers)
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
        keys, values, first_logits = self._prefill(prompts, ids, lengths, settings.prefill_chunk_tokens)
        state = DecodeState(keys, values, lengths, n, T)
        out = torch.full((U, n, T), self.pad_id, dtype=torch.long, device=self.device)
        produced = torch.full((U, n), T, dtype=torch.long, device=self.device)  # tokens before EOS
        stopped = torch.zeros((U, n), dtype=torch.bool, device=self.device)
        alive = torch.arange(U, device=self.device)  # original user of each batch slot
        logits = first_logits[:, None, :].expand(U, n, -1)
        buffers = NucleusBuffers()
        for t in range(T):
            tokens = _pick(logits, settings, generator, buffers)
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

    def _prefill(self, prompts: list[list[int]], ids: torch.Tensor, lengths: torch.Tensor, chunk_tokens: int):
        """The batch's prompt caches and first logits, prefilled in chunks of consecutive users of at most
        ``chunk_tokens`` padded tokens (at least one user each), written into caches as wide as the batch's
        longest prompt (the columns past a prompt's length are masked in decoding)."""
        chunks, start, width = [], 0, 0  # (first user, end, the chunk's longest prompt)
        for i, prompt in enumerate(prompts):
            if i > start and (i - start + 1) * max(width, len(prompt)) > chunk_tokens:
                chunks.append((start, i, width))
                start, width = i, 0
            width = max(width, len(prompt))
        chunks.append((start, len(prompts), width))
        if len(chunks) == 1:
            return self.fast.prefill(ids, lengths)
        keys = values = logits = None
        for lo, hi, width in chunks:
            k, v, first = self.fast.prefill(ids[lo:hi, :width], lengths[lo:hi])
            if keys is None:
                shape = (len(prompts), k[0].shape[1], ids.shape[1], k[0].shape[3])
                keys = [torch.zeros(shape, dtype=k[0].dtype, device=self.device) for _ in k]
                values = [torch.zeros(shape, dtype=v[0].dtype, device=self.device) for _ in v]
                logits = torch.empty(len(prompts), first.shape[1], dtype=first.dtype, device=self.device)
            for layer in range(len(k)):
                keys[layer][lo:hi, :, :width] = k[layer]
                values[layer][lo:hi, :, :width] = v[layer]
            logits[lo:hi] = first
        return keys, values, logits


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
