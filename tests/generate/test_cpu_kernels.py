"""Our CPU kernels (generate/cpu_kernels.py): the decode step's attention over shared prompt caches, and the
layers' fused elementwise operations."""

import pytest
import torch
import torch.nn.functional as F

from dpo4rec.generate import cpu_kernels
from dpo4rec.generate.fast_llama import DecodeState, FastLlama, default_prefix_mode
from dpo4rec.generate.sampler import pad


@pytest.fixture(scope="module")
def kernel():
    module = cpu_kernels.compiled()
    if module is None:
        pytest.skip("the prefix-attention kernel does not run here (needs AVX512-BF16 and a C++ compiler)")
    return module


EMPTY = torch.empty(0)


def _reference_attention(q, keys, values, lengths, suffix_keys=None, suffix_values=None, group=1, bf16_probs=True):
    """Softmax attention in fp32, query by query: query i of b sees keys[b, :lengths[b, i]] and, with suffixes,
    its row's (i // group) own keys and values. With ``bf16_probs`` the prompt's softmax numerators are rounded to
    bf16 before they meet its values, as in the kernel (the sum that divides them is not). Returns out (B, M, d)
    and log-sum-exp (B, M)."""
    B, M, d = q.shape
    out, lse = torch.zeros(B, M, d), torch.zeros(B, M)
    for b in range(B):
        for i in range(M):
            k, v = keys[b, : lengths[b, i]].float(), values[b, : lengths[b, i]].float()
            if suffix_keys is not None:
                k, v = torch.cat([k, suffix_keys[b, i // group]]), torch.cat([v, suffix_values[b, i // group]])
            scores = (q[b, i].float() @ k.T) * 0.125
            numerators = (scores - scores.max()).exp()
            if bf16_probs:
                numerators[: lengths[b, i]] = numerators[: lengths[b, i]].bfloat16().float()
            out[b, i] = numerators @ v / (scores - scores.max()).exp().sum()
            lse[b, i] = torch.logsumexp(scores, -1)
    return out, lse


def _assert_matches_reference(out, expected):
    """Equal to fp32 rounding, but where a numerator sits at a bf16 rounding boundary: the kernel's exp and
    PyTorch's can round it to neighbouring bf16 values, moving one output by up to ~1e-3 (a key missed or read
    twice moves the mean error by ~1e-3)."""
    error = (out - expected).abs()
    assert error.max() < 2e-3 and error.mean() < 1e-6, (error.max(), error.mean())


@pytest.mark.parametrize("queries", [1, 3, 8, 10, 33])
def test_kernel_equals_reference_attention_over_prompts(kernel, queries):
    """Outputs and log-sum-exps equal softmax attention computed in fp32 on the same bf16 inputs (the probabilities
    rounded to bf16 where the kernel rounds them), for query counts that are and are not multiples of the kernel's
    blocks, and prompt lengths at and around its key blocks: one length per (user, head) as in a decode step, and
    causal lengths (position + 1) as in a prompt's own pass."""
    torch.manual_seed(queries)
    B, P, d = 6, 96, 64
    q = (torch.randn(B, queries, d) * 2).bfloat16()
    keys, values = (torch.randn(B, P, d) * 2).bfloat16(), torch.randn(B, P, d).bfloat16()
    k, v = cpu_kernels.layout(keys, values)
    per_user = torch.tensor([1, 31, 32, 33, 95, 96])[:, None].expand(-1, queries).contiguous()
    causal = (torch.arange(queries)[None] * 3 + torch.arange(B)[:, None] * 7) % P + 1
    for lengths in (per_user, causal):
        out, lse = kernel.attention(q, k, v, lengths, 0.125, EMPTY, EMPTY, 0, 1)
        expected, expected_lse = _reference_attention(q, keys, values, lengths)
        _assert_matches_reference(out, expected)
        assert torch.allclose(lse, expected_lse, atol=1e-5, rtol=1e-6)
    # against exact fp32 attention, the bf16 probabilities cost what they cost PyTorch's fused kernel, which also
    # rounds them (and the model's own attention does)
    mask = torch.where(torch.arange(P)[None, None] >= per_user[:, None, :1], float("-inf"), 0.0)[:, None]
    flash, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q[:, None], keys[:, None], values[:, None], 0.0, False, attn_mask=mask, scale=0.125)
    exact, _ = _reference_attention(q, keys, values, per_user, bf16_probs=False)
    out, _ = kernel.attention(q, k, v, per_user, 0.125, EMPTY, EMPTY, 0, 1)
    assert (out - exact).abs().max() < 1e-2
    assert (out - exact).abs().mean() < 1.5 * (flash[:, 0].float() - exact).abs().mean()


@pytest.mark.parametrize("rows,group,suffix_len,capacity", [(1, 3, 1, 64), (10, 3, 17, 64), (4, 3, 64, 64), (3, 1, 33, 40)])
def test_kernel_equals_reference_attention_over_prompt_and_own_suffix(kernel, rows, group, suffix_len, capacity):
    """A decode step: each query sees its user's prompt and the first ``suffix_len`` of its own row's keys
    (fp32, their probabilities too), one softmax over both."""
    torch.manual_seed(rows * 100 + suffix_len)
    B, P, d = 4, 70, 64
    M = rows * group
    q = (torch.randn(B, M, d) * 2).bfloat16()
    keys, values = (torch.randn(B, P, d) * 2).bfloat16(), torch.randn(B, P, d).bfloat16()
    k, v = cpu_kernels.layout(keys, values)
    lengths = torch.tensor([1, 33, 64, 70])[:, None].expand(-1, M).contiguous()
    suffix_keys = torch.randn(B, rows, capacity, d) * 2
    suffix_values = torch.randn(B, rows, capacity, d)
    out, lse = kernel.attention(q, k, v, lengths, 0.125, suffix_keys, suffix_values,
                                suffix_len, group)
    expected, expected_lse = _reference_attention(q, keys, values, lengths, suffix_keys[:, :, :suffix_len],
                                                  suffix_values[:, :, :suffix_len], group)
    _assert_matches_reference(out, expected)
    assert torch.allclose(lse, expected_lse, atol=1e-5, rtol=1e-6)


def test_kernel_refuses_what_it_cannot_read(kernel):
    q = torch.zeros(2, 3, 64, dtype=torch.bfloat16)
    k, v = cpu_kernels.layout(torch.zeros(2, 40, 64, dtype=torch.bfloat16), torch.zeros(2, 40, 64, dtype=torch.bfloat16))
    good = torch.tensor([[3] * 3, [40] * 3])
    with pytest.raises(RuntimeError, match="lengths"):
        kernel.attention(q, k, v, torch.tensor([[0] * 3, [40] * 3]), 0.125, EMPTY, EMPTY, 0, 1)
    with pytest.raises(RuntimeError, match="Pp a multiple"):
        kernel.attention(q, k[:, :, :40].contiguous(), v[:, :20].contiguous(), good, 0.125, EMPTY, EMPTY, 0, 1)
    with pytest.raises(RuntimeError, match="bf16"):
        kernel.attention(q.float(), k, v, good, 0.125, EMPTY, EMPTY, 0, 1)
    with pytest.raises(RuntimeError, match="suffix_keys"):  # 3 queries are not 2 rows x group 1
        kernel.attention(q, k, v, good, 0.125, torch.zeros(2, 2, 8, 64), torch.zeros(2, 2, 8, 64), 4, 1)


def test_prompt_attention_in_the_kernel_equals_causal_fp32_attention(kernel):
    """A prompt's own attention (prefill): causal, grouped query heads, prompt lengths around the key blocks."""
    torch.manual_seed(0)
    U, H, kvh, d = 2, 9, 3, 64
    fast = FastLlama.__new__(FastLlama)  # the method reads nothing of the model
    for P in (1, 31, 70):
        q = (torch.randn(U, H, P, d) * 2).bfloat16()
        k, v = (torch.randn(U, kvh, P, d) * 2).bfloat16(), torch.randn(U, kvh, P, d).bfloat16()
        got = FastLlama._prompt_attention_kernel(fast, q, k, v).reshape(U, P, H, d)  # bf16
        expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
        assert torch.allclose(got.float(), expected.transpose(1, 2), atol=1e-2, rtol=1e-2), P
        assert (got.float() - expected.transpose(1, 2)).abs().mean() < 2e-3, P


def test_prefill_with_the_kernel_follows_sdpa(kernel, tokenizer, tiny_run):
    """The bf16 prefill with prompts' attention in our kernel against the same prefill with SDPA: caches and first
    logits agree to bf16 noise (one rounding flip grows over 30 layers); a wrong layout would move them by units."""
    fast, ids, lengths = _bf16_model_and_prompts(tokenizer, tiny_run)
    keys, _, first = fast.prefill(ids, lengths)  # the kernel's prefill (the default here)
    fast.prompt_kernel = False
    sdpa_keys, _, sdpa_first = fast.prefill(ids, lengths)
    fast.prompt_kernel = True
    assert (first - sdpa_first).abs().mean() < 0.3
    for layer in (0, len(keys) - 1):
        real = torch.arange(keys[layer].shape[2])[None, :] < lengths[:, None]  # right padding's keys are never read
        assert (keys[layer] - sdpa_keys[layer]).float().abs()[real[:, None, :, None].expand_as(keys[layer])].mean() < 0.05


def _bf16_model_and_prompts(tokenizer, tiny_run):
    """A bf16 model's decoder and three right-padded prompts of different lengths (ids, lengths)."""
    import pandas as pd

    from dpo4rec.llm import load_model

    fast = FastLlama(load_model("smollm2-135m", dtype=torch.bfloat16))
    texts = pd.read_parquet(tiny_run / "prompts" / "prompts.parquet")["text"].tolist()[:3]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids, mask = pad(prompts, tokenizer.pad_token_id, left=False)
    return fast, ids, mask.sum(-1)


def _bf16_caches(tokenizer, tiny_run):
    fast, ids, lengths = _bf16_model_and_prompts(tokenizer, tiny_run)
    keys, values, _ = fast.prefill(ids, lengths)
    return fast, keys, values, lengths


def test_kernel_attention_on_real_caches_follows_fp32_before_and_after_dropping_users(kernel, tokenizer, tiny_run):
    """The decode step's attention over [prompt, own suffix] with the prompt part in our kernel, on a bf16 model's
    real prompt caches (three prompts of different lengths), equals the same attention in fp32 at every layer to
    the bf16 rounding of the prompt's probabilities, and still does after a user is dropped from the batch."""
    fast, keys, values, lengths = _bf16_caches(tokenizer, tiny_run)
    assert default_prefix_mode(keys[0]) == "kernel"
    n, steps = 2, 3
    ours = DecodeState(keys, values, lengths, n, steps, prefix="kernel")
    fp32 = DecodeState([k.float() for k in keys], [v.float() for v in values], lengths, n, steps, prefix="plain")
    kvh, d = keys[0].shape[1], keys[0].shape[3]
    g = fast.n_heads // kvh
    generator = torch.Generator().manual_seed(0)
    for layer in range(len(keys)):
        for step in range(steps):
            suffix = [torch.randn(3, n, kvh, d, generator=generator).bfloat16().float() for _ in range(2)]
            for state in (ours, fp32):  # the same suffix entries in both
                state.step = step
                state.write(layer, *suffix)
    for users in (3, 2):
        if users == 2:
            for state in (ours, fp32):
                state.keep(torch.tensor([0, 2]))
        for layer in range(len(keys)):
            ours.step = fp32.step = steps - 1
            q = torch.randn(users, n, kvh, g, d, generator=generator).bfloat16()
            qp = q.permute(0, 2, 1, 3, 4).reshape(users, kvh, n * g, d)
            got = fast._attend_kernel(q, qp, layer, ours, 1 / d**0.5)
            expected = fast._attend(q, qp, layer, fp32, 1 / d**0.5)
            # the kernel's bf16 probabilities: ~1e-3 of the outputs' size (a user's keys read for another's: units)
            assert torch.allclose(got, expected, atol=1e-2, rtol=1e-2), (users, layer, (got - expected).abs().max())
            assert (got - expected).abs().mean() < 1e-3, (users, layer)


def test_decode_steps_on_the_kernel_follow_fp32_prompt_attention(kernel, tokenizer, tiny_run):
    """Whole decode steps of a bf16 model, the prompt part in our kernel against fp32 plain products on fp32 copies
    of the same caches. Exact attention (above) does not give equal bf16 logits: one bf16 rounding of an attention
    output flipping is amplified over 30 layers (~0.1 on average here, as for PyTorch's fused kernel), so they
    are compared on average, where a wrong layout or a user's keys read for another's moves them by whole units;
    dropping finished users gives the logits of a batch that never held them."""
    fast, keys, values, lengths = _bf16_caches(tokenizer, tiny_run)
    states = {"kernel": DecodeState(keys, values, lengths, 2, 8, prefix="kernel"),
              "fp32": DecodeState([k.float() for k in keys], [v.float() for v in values], lengths, 2, 8, prefix="plain")}
    kept = torch.tensor([0, 2])
    alone = DecodeState([k[kept] for k in keys], [v[kept] for v in values], lengths[kept], 2, 8, prefix="kernel")
    tokens = torch.tensor([[100, 200], [300, 400], [500, 600]])
    for step in range(8):
        if step == 4:
            for state in states.values():
                state.keep(kept)
            lengths, tokens = lengths[kept], tokens[kept]
        outs = {}
        for mode, state in states.items():
            state.step = step
            outs[mode] = fast.decode_step(tokens, (lengths + step)[:, None].expand(-1, 2), state).float()
        assert (outs["kernel"] - outs["fp32"]).abs().mean() < 0.3, step
        alone.step = step
        rows = kept if step < 4 else torch.arange(2)
        own = fast.decode_step(tokens[rows], (lengths[rows] + step)[:, None].expand(-1, 2), alone).float()
        assert torch.allclose(own, outs["kernel"][rows], atol=0.05, rtol=0.02), step
        tokens = outs["fp32"].argmax(-1)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 units of the last place (same-sign values; both bf16)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


@pytest.mark.parametrize("rows", [1, 7, 160, 2053])
def test_fused_ops_equal_the_model_operations(kernel, rows):
    """Each fused operation against the PyTorch operations the Llama modules run on bf16 rows: the residual add,
    rotary embedding and SiLU x up bit for bit; RMSNorm nearly so (its fp32 sum runs in another order: a normalized
    value rounds one bf16 unit apart now and then, two after the weight's product)."""
    generator = torch.Generator().manual_seed(rows)
    D, F_, d, heads = 576, 1536, 64, 15

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).bfloat16()

    x, y, weight = randn(rows, D, scale=3.0), randn(rows, D), (torch.rand(D, generator=generator) + 0.5).bfloat16()

    def rms(t):
        t32 = t.float()
        return weight * (t32 * torch.rsqrt(t32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)

    def close(got, expected):
        ulps = _ulps(got, expected)
        return ulps.max() <= 2 and (ulps == 0).float().mean() > 0.99

    assert close(kernel.rms_norm(x, weight, 1e-5), rms(x))
    summed = x.clone()
    normed = kernel.add_rms_norm(summed, y, weight, 1e-5)
    assert torch.equal(summed, x + y)  # in place
    assert close(normed, rms(x + y))

    gate_up = randn(rows, 2 * F_, scale=3.0)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(kernel.silu_mul(gate_up), F.silu(gate) * up)

    qkv, cos, sin = randn(rows, heads * d), randn(rows, d), randn(rows, d)
    expected = qkv.clone().view(rows, heads, d)
    x_, rotated = expected[:, :12], torch.cat([-expected[:, :12, d // 2:], expected[:, :12, : d // 2]], dim=-1)
    expected[:, :12] = x_ * cos[:, None] + rotated * sin[:, None]
    kernel.rotary_(qkv, cos, sin, 12)  # the first 12 heads (queries and keys), the last 3 (values) left alone
    assert torch.equal(qkv, expected.view(rows, heads * d))


def test_fused_ops_refuse_what_they_cannot_run(kernel):
    """Shapes and dtypes the operations were not written for raise a clear error instead of reading past rows."""
    weight = torch.ones(576, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bf16"):
        kernel.rms_norm(torch.ones(4, 576), weight, 1e-5)  # fp32
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernel.rms_norm(torch.ones(4, 570, dtype=torch.bfloat16), torch.ones(570, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(RuntimeError, match="same shape"):
        kernel.add_rms_norm(torch.ones(4, 576, dtype=torch.bfloat16), torch.ones(3, 576, dtype=torch.bfloat16), weight, 1e-5)
    with pytest.raises(RuntimeError, match="within qkv"):
        kernel.rotary_(torch.ones(4, 640, dtype=torch.bfloat16), torch.ones(4, 64, dtype=torch.bfloat16),
                       torch.ones(4, 64, dtype=torch.bfloat16), 11)


def test_fused_ops_through_the_model_are_as_close_to_fp32_as_pytorch_operations(kernel, tokenizer, tiny_run, model_fp32):
    """A bf16 model's prefill and decode steps with the fused operations, and with PyTorch's, each against the fp32
    model on the same tokens: over 30 layers both carry bf16 noise (~0.1 per logit on average here), and the fused
    operations no more than PyTorch's; a wrong operation would move the logits by units."""
    fast, ids, lengths = _bf16_model_and_prompts(tokenizer, tiny_run)
    assert fast.ops is kernel
    tokens = [torch.tensor([[100, 200], [300, 400], [500, 600]]) + 7 * step for step in range(4)]

    def logits(decoder):
        keys, values, first = decoder.prefill(ids, lengths)
        state = DecodeState(keys, values, lengths, 2, len(tokens))
        out = [first.float()]
        for step, t in enumerate(tokens):
            state.step = step
            out.append(decoder.decode_step(t, (lengths + step)[:, None].expand(-1, 2), state).float())
        return out

    reference = logits(FastLlama(model_fp32))
    errors = {}
    for arm in ("fused", "pytorch"):
        fast.ops = kernel if arm == "fused" else None
        errors[arm] = torch.stack([(got - ref).abs().mean() for got, ref in zip(logits(fast), reference)])
    fast.ops = kernel
    assert errors["fused"].max() < 0.3
    assert errors["fused"].mean() < 1.3 * errors["pytorch"].mean(), errors


@pytest.mark.parametrize("dtype,temperature,vocab", [(torch.bfloat16, 1.0, 49152), (torch.float32, 0.7, 1000)])
def test_sampling_passes_equal_pytorch(kernel, dtype, temperature, vocab):
    """Top-p sampling's fused passes: the weights exp(x / t - max) and their block sums as PyTorch computes them
    (to exp's fp32 rounding), read from expanded logits as the first step passes them, with a vocabulary that
    is not a whole number of vectors; and each row's mass at or above a weight, exactly."""
    generator = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(3, 1, vocab, generator=generator) * 3).to(dtype).expand(3, 4, vocab)  # stride 0 over rows
    weights = torch.empty(12, vocab)
    blocks = kernel.nucleus_weights(logits, temperature, weights, 256)
    expected = logits.reshape(12, vocab).float() / temperature
    expected = (expected - expected.amax(-1, keepdim=True)).exp()
    assert torch.allclose(weights, expected, rtol=1e-6, atol=1e-30)
    starts = torch.arange(0, vocab, 256)
    assert torch.allclose(blocks, torch.stack([expected[:, s : s + 256].sum(-1) for s in starts.tolist()], dim=1), rtol=1e-5)
    p = weights.gather(1, torch.randint(0, vocab, (12, 1), generator=generator))
    for strict in (False, True):
        exact = torch.where(weights > p if strict else weights >= p, weights.double(), 0.0).sum(-1)
        assert torch.allclose(kernel.mass_from(weights, p, strict).double(), exact, rtol=1e-5)
