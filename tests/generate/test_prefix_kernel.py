"""Our CPU kernel for the decode step's attention over shared prompt caches (generate/prefix_kernel.py)."""

import pytest
import torch
import torch.nn.functional as F

from dpo4rec.generate import prefix_kernel
from dpo4rec.generate.fast_llama import DecodeState, FastLlama, default_prefix_mode
from dpo4rec.generate.sampler import pad


@pytest.fixture(scope="module")
def kernel():
    module = prefix_kernel.kernel()
    if module is None:
        pytest.skip("the prefix-attention kernel does not run here (needs AVX512-BF16 and a C++ compiler)")
    return module


def _kernel_layout(keys, values, width):
    """(B, P, 64) bf16 keys and values as the kernel takes them: padded to ``width``, keys' dims in pairs."""
    B, P, d = keys.shape
    k = F.pad(keys, (0, 0, 0, width - P)).view(B, width, d // 2, 2).transpose(1, 2).contiguous()
    return k, F.pad(values, (0, 0, 0, width - P)).contiguous()


@pytest.mark.parametrize("queries", [1, 3, 8, 10, 33])
def test_kernel_equals_fp32_attention(kernel, queries):
    """Outputs and log-sum-exps equal softmax attention computed in fp32 on the same bf16 inputs, for query counts
    that are and are not multiples of the kernel's blocks, and prompt lengths at and around its key blocks."""
    torch.manual_seed(queries)
    lengths = torch.tensor([1, 31, 32, 33, 95, 96])
    B, P, d = len(lengths), 96, 64
    q = (torch.randn(B, queries, d) * 2).bfloat16()
    keys, values = (torch.randn(B, P, d) * 2).bfloat16(), torch.randn(B, P, d).bfloat16()
    k, v = _kernel_layout(keys, values, 96)
    out, lse = kernel.prefix_attention(q, k, v, lengths, 0.125)
    scores = (q.float() @ keys.float().transpose(1, 2)) * 0.125
    scores = scores.masked_fill(torch.arange(P)[None, None] >= lengths[:, None, None], float("-inf"))
    expected = torch.softmax(scores, -1) @ values.float()
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5), (out - expected).abs().max()
    assert torch.allclose(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-6)
    # PyTorch's fused kernel, for scale: it rounds the probabilities to bf16
    flash, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q[:, None], keys[:, None], values[:, None], 0.0, False,
        attn_mask=torch.where(torch.arange(P)[None, None, None] >= lengths[:, None, None, None], float("-inf"), 0.0), scale=0.125)
    assert (flash[:, 0].float() - expected).abs().max() > 10 * (out - expected).abs().max()


def test_kernel_refuses_what_it_cannot_read(kernel):
    q = torch.zeros(2, 3, 64, dtype=torch.bfloat16)
    k, v = _kernel_layout(torch.zeros(2, 40, 64, dtype=torch.bfloat16), torch.zeros(2, 40, 64, dtype=torch.bfloat16), 64)
    with pytest.raises(RuntimeError, match="lengths"):
        kernel.prefix_attention(q, k, v, torch.tensor([0, 40]), 0.125)
    with pytest.raises(RuntimeError, match="Pp a multiple"):
        kernel.prefix_attention(q, k[:, :, :40].contiguous(), v[:, :40].contiguous(), torch.tensor([3, 40]), 0.125)
    with pytest.raises(RuntimeError, match="bf16"):
        kernel.prefix_attention(q.float(), k, v, torch.tensor([3, 40]), 0.125)


def _bf16_caches(tokenizer, tiny_run):
    import pandas as pd

    from dpo4rec.generate.model import load_model

    fast = FastLlama(load_model("smollm2-135m", dtype=torch.bfloat16))
    texts = pd.read_parquet(tiny_run / "prompts" / "prompts.parquet")["text"].tolist()[:3]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids, mask = pad(prompts, tokenizer.pad_token_id, left=False)
    lengths = mask.sum(-1)
    keys, values, _ = fast.prefill(ids, lengths)
    return fast, keys, values, lengths


def test_kernel_attention_on_real_caches_equals_fp32_before_and_after_dropping_users(kernel, tokenizer, tiny_run):
    """The decode step's attention over [prompt, own suffix] with the prompt part in our kernel, on a bf16 model's
    real prompt caches (three prompts of different lengths), equals the same attention in fp32 at every layer,
    and still does after a user is dropped from the batch."""
    fast, keys, values, lengths = _bf16_caches(tokenizer, tiny_run)
    assert default_prefix_mode(keys[0]) == "kernel"
    n, steps = 2, 3
    ours = DecodeState(keys, values, lengths, n, steps, prefix="kernel")
    fp32 = DecodeState([k.float() for k in keys], [v.float() for v in values], lengths, n, steps, prefix="plain")
    kvh, d = keys[0].shape[1], keys[0].shape[3]
    g = fast.n_heads // kvh
    generator = torch.Generator().manual_seed(0)
    for layer in range(len(keys)):
        suffix = [torch.randn(3, n, kvh, steps, d, generator=generator).bfloat16().float() for _ in range(2)]
        for state in (ours, fp32):  # the same suffix entries in both
            state.suffix_k[layer][:, :, :, :steps] = suffix[0]
            state.suffix_v[layer][:, :, :, :steps] = suffix[1]
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
            assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (users, layer, (got - expected).abs().max())


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
