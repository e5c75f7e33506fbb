"""N samples per prompt for Llama-family models, with the prompt evaluated once.

Why not ``model.generate``: a user's prompt (~500 tokens) is 5-10x longer
than each answer, and ``num_return_sequences`` copies the prompt's KV cache to
every sample, so each decoding step reads N copies of the same prefix. Here
each user's prompt is prefilled once (its real tokens only), and the decode
step attends to that one shared prefix from all of the user's N rows, plus
each row's own short suffix cache, which is preallocated so that nothing
grows by concatenation. (Top-p sampling, exact and without sorting
the vocabulary, is in sampler.py.)

Layout: a batch holds U users with n rows each (``(U, n)``); rows that hit EOS
keep their slot until their whole user is done, then finished users are
dropped from every tensor at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpo4rec.generate import cpu_kernels

SUPPORTED = {"llama", "mistral", "qwen2"}

# PyTorch's fused CPU attention, which also returns each query's log-sum-exp (absent in old versions: then unfused)
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
# oneDNN products on weights reordered once into its blocked layout (absent without mkldnn: then F.linear)
_PACK = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
_PACKED_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
# Decode steps of at most this many rows use the packed weights: F.linear reorders bf16 weights on every call,
# which costs as much as the product itself at 10-256 rows; at 512 rows the packed product measured slower.
PACKED_MAX_ROWS = 256
_UNPACKED = (None,) * 4  # a layer's four products through F.linear


def supports(model) -> bool:
    """True for decoder-only models whose layers this module knows how to run."""
    config = model.config
    if config.model_type not in SUPPORTED or getattr(config, "hidden_act", "silu") != "silu":
        return False
    if getattr(config, "mlp_bias", False):
        return False
    # a sliding window would hide part of a long prefix; leave those to model.generate
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return window in (None, 0)


LowRank = tuple[torch.Tensor, torch.Tensor] | None  # (A (R, D_in), B (D_out, R)): adds x A^T B^T


@dataclass
class _Layer:
    norm_in: torch.Tensor
    qkv: torch.Tensor  # (H*d + 2*kvh*d, D): q, k and v projections fused
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    norm_post: torch.Tensor
    gate_up: torch.Tensor  # (2*I, D)
    down: torch.Tensor
    qkv_lora: LowRank = None  # DPO adapters, unmerged (see llm.py)
    o_lora: LowRank = None
    gate_up_lora: LowRank = None
    down_lora: LowRank = None
    packed: tuple | None = None  # qkv, o, gate_up, down reordered for oneDNN (bf16 on CPUs), or None


def _base(module):
    """The plain linear layer (PEFT's LoRA layers wrap it as ``base_layer``)."""
    return getattr(module, "base_layer", module)


def _active_lora(module) -> list[str]:
    if not hasattr(module, "lora_A") or getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return []
    names = [a for a in module.active_adapters if a in module.lora_A]
    if any(getattr(module, "use_dora", {}).get(a) for a in names):
        raise ValueError("DoRA adapters are not supported by the shared-prefix sampler; use generate.backend = hf")
    return names


def low_rank(modules) -> LowRank:
    """The active LoRA updates of ``modules`` (whose outputs are concatenated) as one low-rank pair.

    Each adapter adds ``scaling * B A``; stacking the A's and placing each
    ``scaling * B`` in its own block of rows and columns gives the sum of all
    of them, for fused projections (q|k|v, gate|up) and adapter chains alike.
    """
    pieces, rows = [], 0
    for module in modules:
        for name in _active_lora(module):
            pieces.append((rows, module.lora_A[name].weight, module.lora_B[name].weight * module.scaling[name]))
        rows += _base(module).weight.shape[0]
    if not pieces:
        return None
    dtype = _base(modules[0]).weight.dtype
    a = torch.cat([p[1] for p in pieces]).detach()
    b = torch.zeros(rows, a.shape[0], dtype=torch.float32, device=a.device)
    col = 0
    for row, _, up in pieces:
        b[row : row + up.shape[0], col : col + up.shape[1]] = up.detach().float()
        col += up.shape[1]
    return a.to(dtype), b.to(dtype)


def _linear(x: torch.Tensor, weight: torch.Tensor, lora: LowRank, bias: torch.Tensor | None = None, packed=None) -> torch.Tensor:
    out = F.linear(x, weight, bias) if packed is None else _PACKED_LINEAR(x, packed, bias, "none", [], "")
    if lora is not None:  # x W^T + (x A^T) B^T, the add fused into the second product (x is 2-D here)
        out = torch.addmm(out, F.linear(x, lora[0]), lora[1].T)
    return out


class FastLlama:
    """Decode-only view of a Hugging Face Llama-family model (weights shared, not copied)."""

    def __init__(self, model):
        self.model = model
        config = model.config
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.eps = config.rms_norm_eps
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight
        self.lm_head = model.lm_head.weight
        self.rotary = inner.rotary_emb
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            q, k, v = (_base(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
            bias = None
            if q.bias is not None:
                bias = torch.cat([q.bias, k.bias, v.bias]).detach()
            self.layers.append(_Layer(
                norm_in=layer.input_layernorm.weight.detach(),
                qkv=torch.cat([q.weight, k.weight, v.weight]).detach(),
                qkv_bias=bias,
                o=_base(attn.o_proj).weight.detach(),
                norm_post=layer.post_attention_layernorm.weight.detach(),
                gate_up=torch.cat([_base(mlp.gate_proj).weight, _base(mlp.up_proj).weight]).detach(),
                down=_base(mlp.down_proj).weight.detach(),
                qkv_lora=low_rank([attn.q_proj, attn.k_proj, attn.v_proj]),
                o_lora=low_rank([attn.o_proj]),
                gate_up_lora=low_rank([mlp.gate_proj, mlp.up_proj]),
                down_lora=low_rank([mlp.down_proj]),
            ))
        self.packed_head = self._pack_weights()
        self.ops = self._fused_ops(config)  # the layers' elementwise work in cpu_kernels (None: PyTorch's operations)
        self.prompt_kernel = True  # prompts' own attention in cpu_kernels.py where it runs (False: SDPA)
        self.adapted = any(lora is not None for layer in self.layers
                           for lora in (layer.qkv_lora, layer.o_lora, layer.gate_up_lora, layer.down_lora))

    def _pack_weights(self):
        """Reorder the bf16 CPU weights once for oneDNN (a second copy: ~2 bytes a parameter); returns the LM head's
        (None where nothing is packed). Like the LoRA terms, the copies are taken here: the sampler's model is frozen.

        On a 2-core Xeon with AMX the packed and plain products gave bit-identical outputs for every layer
        shape at 10-300 rows, and a decode step (paired per-step timings) took 7-17% less at 55-160 rows,
        2% less at 253 (docs/generation.md).
        """
        if _PACK is None or _PACKED_LINEAR is None or self.lm_head.device.type != "cpu" or self.lm_head.dtype != torch.bfloat16:
            return None
        if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None  # a CPU without bf16 in oneDNN (no AVX-512): its packed bf16 product would refuse to run
        for layer in self.layers:
            layer.packed = tuple(_PACK(w) for w in (layer.qkv, layer.o, layer.gate_up, layer.down))
        return _PACK(self.lm_head.detach())

    def _fused_ops(self, config):
        """cpu_kernels' compiled module where its fused elementwise operations fit this model (bf16 on a CPU,
        widths in whole 16-lane vectors), else None."""
        widths = (config.hidden_size, config.intermediate_size, self.head_dim // 2)
        if self.embed.device.type != "cpu" or self.embed.dtype != torch.bfloat16 or any(w % 16 for w in widths):
            return None
        return cpu_kernels.compiled()

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.ops is not None:
            return self.ops.rms_norm(x, weight, self.eps)
        # as in LlamaRMSNorm: normalize in fp32, scale in the model's dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x32.to(x.dtype)

    def _add_rms(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor):
        """The residual stream after adding ``delta`` (None: nothing to add) and its RMSNorm: (x + delta, norm).
        The fused operation adds in place: ``x`` is always this module's own activation."""
        if delta is None:
            return x, self._rms(x, weight)
        if self.ops is not None:
            return x, self.ops.add_rms_norm(x, delta, weight, self.eps)
        x = x + delta
        return x, self._rms(x, weight)

    def _qkv(self, h: torch.Tensor, layer: "_Layer", cos: torch.Tensor, sin: torch.Tensor, packed=None):
        """Queries (R, H, d) and keys (R, kvh, d) with the rotary embedding, values (R, kvh * d), of rows ``h``."""
        H, kvh, d = self.n_heads, self.n_kv, self.head_dim
        qkv = _linear(h, layer.qkv, layer.qkv_lora, layer.qkv_bias, packed)  # (R, (H + 2 kvh) d)
        if self.ops is not None:  # rotated in place: queries and keys are the first H + kvh heads of each row
            self.ops.rotary_(qkv, cos, sin, H + kvh)
            q, k, v = qkv.split([H * d, kvh * d, kvh * d], dim=-1)
            return q.view(-1, H, d), k.view(-1, kvh, d), v
        q, k, v = qkv.split([H * d, kvh * d, kvh * d], dim=-1)
        return _rotate(q.view(-1, H, d), cos, sin), _rotate(k.view(-1, kvh, d), cos, sin), v

    def _mlp(self, h: torch.Tensor, layer: "_Layer", packed: tuple = _UNPACKED) -> torch.Tensor:
        """SwiGLU of the normed rows ``h``: what the layer adds to the residual stream."""
        gate_up = _linear(h, layer.gate_up, layer.gate_up_lora, packed=packed[2])
        if self.ops is not None:
            act = self.ops.silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
        return _linear(act, layer.down, layer.down_lora, packed=packed[3])

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor):
        """Run right-padded prompts ``(U, P)`` once; return the KV cache and each prompt's last logits.

        Right padding needs no attention mask: under causal attention a real
        token never sees the pads after it, so SDPA can take its faster
        ``is_causal`` path. The pads' own keys are masked out in decoding.
        Our own forward runs where the model has adapters or where the prompts'
        attention runs in our kernel; else the model's forward.
        """
        fused = self.adapted or self._prompt_kernel_runs(input_ids.device)
        return (self._prefill_fused if fused else self._prefill_model)(input_ids, lengths)

    def _prompt_kernel_runs(self, device: torch.device) -> bool:
        """Whether prompts' own attention runs in cpu_kernels.py here (a 2-core AMD EPYC: prefill 1.2x faster)."""
        return (self.prompt_kernel and device.type == "cpu" and self.embed.dtype == torch.bfloat16
                and self.head_dim == cpu_kernels.HEAD_DIM and cpu_kernels.compiled() is not None)

    @torch.inference_mode()
    def _prefill_model(self, input_ids: torch.Tensor, lengths: torch.Tensor):
        """The prefill by the model's own forward (without adapters: the same weights, its tuned kernels)."""
        out = self.model.model(input_ids=input_ids, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values  # renamed in transformers 5
        keys = [layer.keys for layer in cache.layers]  # each (U, kvh, P, d), rotary applied
        values = [layer.values for layer in cache.layers]
        last = out.last_hidden_state[torch.arange(len(lengths), device=lengths.device), lengths - 1]  # (U, D), final norm applied
        return keys, values, F.linear(last, self.lm_head).float()

    @torch.inference_mode()
    def _prefill_fused(self, input_ids: torch.Tensor, lengths: torch.Tensor):
        """The prefill on this module's fused weights, adapters as low-rank terms (as decoding runs them).

        With DPO adapters the model's own forward runs each LoRA layer apart,
        casting bf16 activations up to the fp32 adapter weights: ~2x the
        prefill's time. Without adapters it gives the model's forward's logits
        exactly (SDPA), and is used where the attention runs in our kernel.

        Only the prompts' real tokens pass through the layers' products (the
        pads were ~16% of 16 ML-1M prompts' rows); they are spread into the
        padded (U, P) layout for the attention alone.
        """
        U, P = input_ids.shape
        H, kvh, d = self.n_heads, self.n_kv, self.head_dim
        real = (torch.arange(P, device=input_ids.device)[None, :] < lengths[:, None]).reshape(-1)  # (U P,)
        rows = real.nonzero().squeeze(1)  # each real token's row in the padded layout
        x = self.embed[input_ids.reshape(-1)[rows]]  # (N, D), N real tokens
        cos, sin = self.rotary(x, torch.arange(P, device=x.device).repeat(U)[rows][None])
        cos, sin = cos[0].to(x.dtype), sin[0].to(x.dtype)

        def padded(t: torch.Tensor) -> torch.Tensor:  # (N, ...) -> (U, P, ...), zeros at the pads
            out = t.new_zeros(U * P, *t.shape[1:])
            out[rows] = t
            return out.view(U, P, *t.shape[1:])

        keys, values = [], []
        use_kernel = self._prompt_kernel_runs(x.device)
        delta = None  # what the last sublayer adds to the residual stream x, added with the next norm
        for layer in self.layers:
            x, h = self._add_rms(x, delta, layer.norm_in)
            q, k, v = self._qkv(h, layer, cos, sin)
            q = padded(q).transpose(1, 2)  # (U, H, P, d)
            keys.append(padded(k).transpose(1, 2).contiguous())  # (U, kvh, P, d): decoding reads them every step
            values.append(padded(v.view(-1, kvh, d)).transpose(1, 2).contiguous())
            if use_kernel:
                attn = self._prompt_attention_kernel(q, keys[-1], values[-1], lengths)
            else:  # right padding: under causal attention no real token sees the pads after it
                attn = F.scaled_dot_product_attention(q, keys[-1], values[-1], is_causal=True, enable_gqa=H != kvh).transpose(1, 2)
            attn = attn.reshape(U * P, H * d)[rows]
            x, h = self._add_rms(x, _linear(attn, layer.o, layer.o_lora), layer.norm_post)
            delta = self._mlp(h, layer)
        x = x + delta
        last = self._rms(x[lengths.cumsum(0) - 1], self.final_norm)  # each prompt's last real token
        return keys, values, F.linear(last, self.lm_head).float()

    def _prompt_attention_kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention of prompts q (U, H, P, d) over their keys and values (U, kvh, P, d) in our kernel:
        query p sees keys [0, p]. Returns (U, P, kvh, H / kvh, d) in q's dtype. With the prompts' ``lengths``
        (U,), queries past them (pads, whose outputs are dropped) see one key only."""
        U, H, P, d = q.shape
        kvh = k.shape[1]
        g = H // kvh
        k, v = cpu_kernels.layout(k.reshape(U * kvh, P, d), v.reshape(U * kvh, P, d))
        seen = (torch.arange(P, device=q.device) + 1)[None].expand(U, -1)  # (U, P)
        if lengths is not None:
            seen = torch.where(seen <= lengths[:, None], seen, 1)
        lengths = seen.repeat(1, g).repeat_interleave(kvh, dim=0).contiguous()  # (U kvh, g P), queries as q orders them
        empty = q.new_empty(0, dtype=torch.float32)
        out, _ = cpu_kernels.compiled().attention(q.reshape(U * kvh, g * P, d).contiguous(), k, v, lengths,
                                                  1.0 / math.sqrt(d), empty, empty, 0, g)
        return out.view(U, kvh, g, P, d).permute(0, 3, 1, 2, 4).to(q.dtype)

    @torch.inference_mode()
    def decode_step(self, tokens, positions, state: "DecodeState") -> torch.Tensor:
        """One new token for every row. tokens, positions: (U, n). Returns logits (U, n, V)."""
        U, n = tokens.shape
        H, kvh, d = self.n_heads, self.n_kv, self.head_dim
        g = H // kvh
        x = self.embed[tokens.reshape(-1)]  # (R, D)
        cos, sin = self.rotary(x, positions.reshape(1, -1))  # (1, R, d)
        cos, sin = cos[0].to(x.dtype), sin[0].to(x.dtype)
        scale = 1.0 / math.sqrt(d)
        use_packed = self.packed_head is not None and x.shape[0] <= PACKED_MAX_ROWS
        delta = None  # what the last sublayer adds to the residual stream x, added with the next norm
        for i, layer in enumerate(self.layers):
            packed = layer.packed if use_packed else _UNPACKED
            x, h = self._add_rms(x, delta, layer.norm_in)
            q, k, v = self._qkv(h, layer, cos, sin, packed[0])  # (R, H, d), (R, kvh, d), (R, kvh d)
            state.write(i, k.view(U, n, kvh, d), v.view(U, n, kvh, d))
            q = q.view(U, n, kvh, g, d)
            # shared prefix: all n*g query heads of a KV group meet the user's prefix once
            qp = q.permute(0, 2, 1, 3, 4).reshape(U, kvh, n * g, d)
            if state.prefix == "kernel":
                attn = self._attend_kernel(q, qp, i, state, scale)
            elif state.prefix == "flash":
                attn = self._attend_fused(q, qp, i, state, scale)
            else:
                attn = self._attend(q, qp, i, state, scale)
            o = _linear(attn.to(x.dtype).reshape(U * n, H * d), layer.o, layer.o_lora, packed=packed[1])
            x, h = self._add_rms(x, o, layer.norm_post)
            delta = self._mlp(h, layer, packed)
        x, h = self._add_rms(x, delta, self.final_norm)
        head = self.packed_head if use_packed else None
        return _linear(h, self.lm_head, None, packed=head).view(U, n, -1)  # model dtype: sampling reads it as is

    def _attend(self, q, qp, i: int, state: "DecodeState", scale: float) -> torch.Tensor:
        """Attention over [prefix, own suffix] as plain products and one softmax. q: (U, n, kvh, g, d)."""
        U, n, kvh, g, d = q.shape
        t = state.step
        # (U, kvh, n*g, P), keys kept transposed here; caches of another dtype than q's (an fp32 reference) are read as they are
        s_pre = torch.matmul(qp.to(state.prefix_keys[i].dtype), state.prefix_keys[i]).float()
        s_pre.mul_(scale).add_(state.prefix_bias)  # -inf on padding
        # each row's own suffix (U, n, kvh, g, t+1); small, so it is moved into the prefix's layout
        s_suf = torch.matmul(q.to(state.suffix_k[i].dtype), state.suffix_k[i][:, :, :, : t + 1].transpose(-1, -2))
        s_suf = s_suf.float().mul_(scale).permute(0, 2, 1, 3, 4).reshape(U, kvh, n * g, t + 1)
        # one softmax over [prefix, suffix] without concatenating them
        m = torch.maximum(s_pre.amax(-1, keepdim=True), s_suf.amax(-1, keepdim=True))
        s_pre.sub_(m).exp_()
        s_suf.sub_(m).exp_()
        inv = 1.0 / (s_pre.sum(-1, keepdim=True) + s_suf.sum(-1, keepdim=True))
        o_pre = torch.matmul(s_pre.mul_(inv).to(state.prefix_v[i].dtype), state.prefix_v[i])  # (U, kvh, n*g, d)
        p_suf = s_suf.mul_(inv).to(state.suffix_v[i].dtype).view(U, kvh, n, g, t + 1).permute(0, 2, 1, 3, 4)
        o_suf = torch.matmul(p_suf, state.suffix_v[i][:, :, :, : t + 1])  # (U, n, kvh, g, d)
        return o_suf + o_pre.view(U, kvh, n, g, d).permute(0, 2, 1, 3, 4)

    def _attend_fused(self, q, qp, i: int, state: "DecodeState", scale: float) -> torch.Tensor:
        """The same attention, the prefix part by PyTorch's fused CPU kernel, joined to the suffix by log-sum-exp.

        The unfused prefix part writes (U, kvh, n*g, P) fp32 scores and passes over them five times; on a
        2-core CPU that was ~45% of the decode step, and the fused kernel does it in ~1/3 of the time.
        """
        U, n, kvh, g, d = q.shape
        o_pre, lse = _FLASH_CPU(qp, state.prefix_keys[i], state.prefix_v[i], 0.0, False, attn_mask=state.prefix_bias, scale=scale)
        return self._join_suffix(q, o_pre.float(), lse, i, state, scale)

    def _attend_kernel(self, q, qp, i: int, state: "DecodeState", scale: float) -> torch.Tensor:
        """The same attention in one call of our AVX512-BF16 kernel (cpu_kernels.py): the prefix, each row's own
        suffix and one softmax over both, in fp32 but for the products with the bf16 prompt keys and values (the
        prompt's probabilities rounded to bf16, as the model's own attention does)."""
        U, n, kvh, g, d = q.shape
        T = state.suffix_k[i].shape[-2]
        out, _ = cpu_kernels.compiled().attention(
            qp.reshape(U * kvh, n * g, d), state.prefix_keys[i].view(U * kvh, d // 2, -1, 2),
            state.prefix_v[i].view(U * kvh, -1, d, 2), state.query_lengths(n * g), scale,
            state.suffix_k[i].view(U * kvh, n, T, d), state.suffix_v[i].view(U * kvh, n, T, d), state.step + 1, g)
        return out.view(U, kvh, n, g, d).permute(0, 2, 1, 3, 4)

    def _join_suffix(self, q, o_pre, lse, i: int, state: "DecodeState", scale: float) -> torch.Tensor:
        """Attention over [prefix, own suffix] from the prefix part's output ``o_pre`` (fp32, normalized, laid out
        (U, kvh, n*g, d)) and its log-sum-exp: out = (e^lse o_pre + sum_j e^(s_j) v_j) / (e^lse + sum_j e^(s_j))."""
        U, n, kvh, g, d = q.shape
        t = state.step
        o_pre = o_pre.view(U, kvh, n, g, d).permute(0, 2, 1, 3, 4)  # (U, n, kvh, g, d)
        lse = lse.view(U, kvh, n, g).permute(0, 2, 1, 3)[..., None]  # (U, n, kvh, g, 1)
        s_suf = torch.matmul(q.float(), state.suffix_k[i][:, :, :, : t + 1].transpose(-1, -2)).mul_(scale)
        m = torch.maximum(lse, s_suf.amax(-1, keepdim=True))
        w_pre = (lse - m).exp_()
        s_suf = s_suf.sub_(m).exp_()  # (U, n, kvh, g, t+1)
        o = torch.matmul(s_suf, state.suffix_v[i][:, :, :, : t + 1]).add_(o_pre * w_pre)
        return o.div_(s_suf.sum(-1, keepdim=True).add_(w_pre))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, HF's rotate-half convention. x: (R, heads, d); cos/sin: (R, d)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


PREFIX_MODES = ("kernel", "flash", "plain")


def default_prefix_mode(keys: torch.Tensor) -> str:
    """How a decode step attends to the prompt caches ``keys`` (U, kvh, P, d): our AVX512-BF16 kernel on CPUs that
    have it (bf16 caches, head size 64), else PyTorch's fused CPU kernel, else (GPUs) plain products."""
    if keys.device.type != "cpu":
        return "plain"
    if keys.dtype == torch.bfloat16 and keys.shape[-1] == cpu_kernels.HEAD_DIM and cpu_kernels.compiled() is not None:
        return "kernel"
    return "flash" if _FLASH_CPU is not None else "plain"


class DecodeState:
    """Shared prefix caches per user and preallocated suffix caches per row.

    Layouts chosen by measurement on a 2-core CPU (16 users x 10 rows, 611-token prefixes), by ``prefix``
    mode: "kernel" (cpu_kernels.py) keeps each key's dims in pairs, (U, kvh, d/2, P', 2), and each dim's values
    of two keys side by side, (U, kvh, P'/2, d, 2), with P' the prompt width rounded up to the kernel's key
    block; "flash" (PyTorch's fused CPU kernel) reads the keys as they come, (U, kvh, P, d); "plain" keeps them
    transposed, (U, kvh, d, P), so the scores are a plain product (~1.8x faster than multiplying by a transposed
    view). On CPUs the suffix caches are fp32 (the bf16 keys and values stored exactly), because products over
    many tiny (3 x 64 x t) blocks run 1.7-2x faster in fp32 there.
    """

    def __init__(self, keys, values, lengths: torch.Tensor, n_rows: int, max_new_tokens: int, prefix: str | None = None):
        U, kvh, P, d = keys[0].shape
        device = keys[0].device
        self.prefix = default_prefix_mode(keys[0]) if prefix is None else prefix
        if self.prefix not in PREFIX_MODES:
            raise ValueError(f"prefix must be one of {PREFIX_MODES}, got {self.prefix!r}")
        suffix_dtype = torch.float32 if device.type == "cpu" else keys[0].dtype
        self.kernel_lengths = lengths.repeat_interleave(kvh).to(torch.long)  # per (user, KV head), as the kernel takes them
        self._query_lengths = None
        if self.prefix == "kernel":
            self.prefix_keys, self.prefix_v = map(list, zip(*(cpu_kernels.layout(k, v) for k, v in zip(keys, values))))
        else:
            self.prefix_keys = [(k if self.prefix == "flash" else k.transpose(-1, -2)).contiguous() for k in keys]
            self.prefix_v = values
        padding = torch.arange(P, device=device)[None, :] >= lengths[:, None]  # (U, P): right padding
        self.prefix_bias = torch.zeros(U, 1, 1, P, device=device).masked_fill_(padding[:, None, None, :], float("-inf"))
        # the kernel reads (user, KV head)-major suffixes, (U, kvh, n, T, d); the others (U, n, kvh, T, d)
        shape = (U, kvh, n_rows, max_new_tokens, d) if self.prefix == "kernel" else (U, n_rows, kvh, max_new_tokens, d)
        # never read past the current step: left unfilled (zeros were a ~0.5 GB write per batch of 160 rows)
        self.suffix_k = [torch.empty(shape, dtype=suffix_dtype, device=device) for _ in keys]
        self.suffix_v = [torch.empty(shape, dtype=suffix_dtype, device=device) for _ in keys]
        self.step = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the step's keys and values (U, n, kvh, d) of every row in its suffix cache at position ``step``."""
        if self.prefix == "kernel":
            self.suffix_k[layer][:, :, :, self.step] = k.permute(0, 2, 1, 3)
            self.suffix_v[layer][:, :, :, self.step] = v.permute(0, 2, 1, 3)
        else:
            self.suffix_k[layer][:, :, :, self.step] = k
            self.suffix_v[layer][:, :, :, self.step] = v

    def query_lengths(self, queries: int) -> torch.Tensor:
        """(U * kvh, queries): each query's prompt length, as the kernel takes them (kept until users are dropped)."""
        if self._query_lengths is None or self._query_lengths.shape[1] != queries:
            self._query_lengths = self.kernel_lengths[:, None].expand(-1, queries).contiguous()
        return self._query_lengths

    def keep(self, users: torch.Tensor) -> None:
        """Drop every user not in ``users`` (indices), from every tensor."""
        kvh = self.prefix_keys[0].shape[1]
        self.kernel_lengths = self.kernel_lengths.view(-1, kvh).index_select(0, users).reshape(-1)
        self._query_lengths = None
        self.prefix_keys = [k.index_select(0, users) for k in self.prefix_keys]
        self.prefix_v = [v.index_select(0, users) for v in self.prefix_v]
        self.prefix_bias = self.prefix_bias.index_select(0, users)
        self.suffix_k = [k.index_select(0, users) for k in self.suffix_k]
        self.suffix_v = [v.index_select(0, users) for v in self.suffix_v]
