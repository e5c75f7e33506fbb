import pandas as pd
import pytest
import torch

from dpo4rec.generate.fast_llama import FastLlama, supports
from dpo4rec.generate.sampler import (
    FastSampler, HFSampler, SamplerSettings, batch_generator, pad, plan_batches, top_p_sample,
)


def _prompts(run, tokenizer, n):
    texts = pd.read_parquet(run / "prompts" / "prompts.parquet")["text"].tolist()[:n]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_shared_prefix_decoder_matches_the_hf_forward(tiny_lm, tokenizer, tiny_run):
    """Logits of our decode step equal the HF model's on the same tokens (fp32)."""
    assert supports(tiny_lm)
    prompts = _prompts(tiny_run, tokenizer, 3)
    fast = FastLlama(tiny_lm)
    ids, mask = pad(prompts, tokenizer.pad_token_id, left=False)
    lengths = mask.sum(-1)
    keys, values, first = fast.prefill(ids, lengths)
    from dpo4rec.generate.fast_llama import DecodeState

    state = DecodeState(keys, values, lengths, n_rows=2, max_new_tokens=4)
    tokens = torch.tensor([[100, 200], [300, 400], [500, 600]])
    logits = fast.decode_step(tokens, lengths[:, None].expand(-1, 2), state)
    with torch.inference_mode():
        for u, prompt in enumerate(prompts):
            reference = tiny_lm(torch.tensor([prompt])).logits[0, -1]
            assert torch.allclose(first[u], reference, atol=2e-3)
            for r in range(2):
                full = torch.tensor([prompt + [int(tokens[u, r])]])
                expected = tiny_lm(full).logits[0, -1]
                assert torch.allclose(logits[u, r], expected, atol=2e-3), (u, r)


def test_greedy_text_equals_generate(model_fp32, tokenizer, tiny_run):
    prompts = _prompts(tiny_run, tokenizer, 3)
    settings = SamplerSettings(n_samples=2, max_new_tokens=12, greedy=True)
    eos, pad_id = [tokenizer.eos_token_id], tokenizer.pad_token_id
    ours = FastSampler(model_fp32, eos, pad_id).sample(prompts, settings, batch_generator(0, 0))
    theirs = HFSampler(model_fp32, eos, pad_id).sample(prompts, settings, batch_generator(0, 0))
    for a, b in zip(ours, theirs):
        assert len(a) == len(b) == 3
        assert a[0].token_ids == b[0].token_ids
        assert all(len(c.token_ids) <= 12 for c in a)
    # same generator seed -> same samples; the N samples of a user differ
    again = FastSampler(model_fp32, eos, pad_id).sample(prompts, settings, batch_generator(0, 0))
    assert [[c.token_ids for c in u] for u in again] == [[c.token_ids for c in u] for u in ours]
    assert any(u[1].token_ids != u[2].token_ids for u in ours)


def test_top_p_keeps_the_nucleus_only():
    generator = batch_generator(1, 0)
    peaked = torch.full((200, 1000), -20.0)
    peaked[:, 7] = 5.0  # ~all the mass on token 7
    assert (top_p_sample(peaked, 1.0, 0.9, generator) == 7).all()
    # 10 tokens hold 0.8 of the mass, 90 share 0.2: a nucleus of 0.5 is 7 of the 10 (within the top 64: fast path);
    # with top_p ignored, a fifth of 2,000 picks would land outside them
    probs = torch.zeros(1000)
    probs[:10], probs[10:100] = 0.08, 0.2 / 90
    head = probs.log().expand(2000, -1)
    picks = top_p_sample(head, 1.0, 0.5, generator)
    assert picks.max() < 10 and 5 <= len(picks.unique()) <= 8
    # 200 tokens hold 0.8, 800 share 0.2: the top 64 hold only 0.26 < p, so the full-sort path runs;
    # a nucleus of 0.5 is ~125 of the 200
    probs = torch.zeros(1000)
    probs[:200], probs[200:] = 0.004, 0.2 / 800
    picks = top_p_sample(probs.log().expand(2000, -1), 1.0, 0.5, generator)
    assert picks.max() < 200 and 100 <= len(picks.unique()) <= 130
    # bf16 logits work too
    assert (top_p_sample(peaked.bfloat16(), 0.7, 0.9, generator) == 7).all()


def test_plan_batches_caps_rows_and_prefill():
    lengths = [10, 50, 30, 40, 20]
    batches = plan_batches(lengths, rows_per_prompt=3, max_rows=6, max_prefill_tokens=1000)
    assert batches == [[1, 3], [2, 4], [0]]  # longest first, 2 prompts x 3 rows each
    assert plan_batches(lengths, 1, 100, 90) == [[1], [3, 2], [4, 0]]


def test_top_p_draws_follow_the_nucleus_distribution():
    """The rejection sampler's draws match the sorted-nucleus distribution (renormalized), token by token."""
    generator = batch_generator(2, 0)
    logits = torch.randn(1, 2000, generator=torch.Generator().manual_seed(3)) * 3.0
    probs = torch.softmax(logits[0], -1)
    values, order = torch.sort(probs, descending=True, stable=True)
    nucleus = order[(values.cumsum(0) - values) < 0.8]
    target = torch.zeros_like(probs)
    target[nucleus] = probs[nucleus] / probs[nucleus].sum()
    draws = torch.cat([top_p_sample(logits.expand(4000, -1), 1.0, 0.8, generator) for _ in range(5)])
    assert bool((target[draws] > 0).all())  # nothing from outside the nucleus
    empirical = torch.bincount(draws, minlength=len(probs)).float() / len(draws)
    assert 0.5 * float((empirical - target).abs().sum()) < 0.04, len(nucleus)  # sampling noise is ~0.015 here
    # temperature applies before the nucleus: at 0.5 the head sharpens and the nucleus shrinks
    cooled = top_p_sample(logits.expand(4000, -1), 0.5, 0.8, generator)
    assert len(cooled.unique()) < len(draws.unique())


@pytest.mark.parametrize("passes", ["cpu_kernels", "pytorch"])
def test_nucleus_membership_equals_the_sorted_definition_with_ties(passes, monkeypatch):
    """The fast membership test (mass by one pass, or by ratio thresholds in PyTorch; exact path near the edge)
    decides every drawn token as sorting would: bf16 logits tie often, and ties are ranked in index order."""
    from dpo4rec.generate import sampler
    from dpo4rec.generate.sampler import _in_nucleus

    if passes == "pytorch":
        monkeypatch.setattr(sampler, "_fused_ops", lambda logits: None)

    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(300, 3000, generator=gen) * 2.0).bfloat16().float()  # ~256 distinct values per octave
    logits[:100, :40] = 10.0  # rows whose head is one big tie (~97% of the mass) that straddles the edge
    weights = (logits - logits.amax(-1, keepdim=True)).exp()
    total = weights.sum(-1, keepdim=True)
    pick = torch.randint(0, 3000, (300, 1), generator=gen)
    pick[:50] = torch.randint(0, 40, (50, 1), generator=gen)
    got = _in_nucleus(weights, pick, 0.9, total, torch.empty_like(weights))
    expected = []
    for row in range(300):
        order = sorted(range(3000), key=lambda j: (-float(weights[row, j]), j))
        before = 0.0
        for j in order:
            if j == int(pick[row]):
                break
            before += float(weights[row, j])
        expected.append(before < 0.9 * float(total[row]))
    assert got.tolist() == expected
    assert 20 < sum(expected) < 280  # both outcomes occur


def test_fused_prefix_attention_equals_the_unfused(tiny_lm, tokenizer, tiny_run):
    """CPUs run the prefix part in PyTorch's fused kernel, joined to the suffix by log-sum-exp; GPUs run plain
    products and one softmax. Over several steps (suffixes growing) both give the same logits."""
    from dpo4rec.generate.fast_llama import DecodeState

    prompts = _prompts(tiny_run, tokenizer, 3)
    fast = FastLlama(tiny_lm)
    ids, mask = pad(prompts, tokenizer.pad_token_id, left=False)
    lengths = mask.sum(-1)
    keys, values, _ = fast.prefill(ids, lengths)
    states = [DecodeState(keys, values, lengths, n_rows=2, max_new_tokens=5, prefix=mode) for mode in ("flash", "plain")]
    tokens = torch.tensor([[100, 200], [300, 400], [500, 600]])
    for step in range(5):
        outs = []
        for state in states:
            state.step = step
            outs.append(fast.decode_step(tokens, (lengths + step)[:, None].expand(-1, 2), state))
        assert torch.allclose(outs[0], outs[1], atol=1e-3), step
        tokens = outs[0].argmax(-1)


def test_packed_weights_give_the_plain_products_logits(tokenizer, tiny_run):
    """bf16 on CPUs: decode steps on oneDNN-packed weights give the logits of F.linear on the plain weights
    (bit-identical where measured; allowed bf16 rounding here) and so the same greedy tokens."""
    from dpo4rec.generate.fast_llama import DecodeState
    from dpo4rec.llm import load_model

    fast = FastLlama(load_model("smollm2-135m", dtype=torch.bfloat16))
    if fast.packed_head is None:
        pytest.skip("this torch has no oneDNN packed linear")
    prompts = _prompts(tiny_run, tokenizer, 3)
    ids, mask = pad(prompts, tokenizer.pad_token_id, left=False)
    lengths = mask.sum(-1)
    keys, values, _ = fast.prefill(ids, lengths)
    packed_head = fast.packed_head
    states = [DecodeState(keys, values, lengths, n_rows=2, max_new_tokens=4) for _ in range(2)]
    tokens = torch.tensor([[100, 200], [300, 400], [500, 600]])
    for step in range(4):
        outs = []
        for state, head in zip(states, (packed_head, None)):
            fast.packed_head = head
            state.step = step
            outs.append(fast.decode_step(tokens, (lengths + step)[:, None].expand(-1, 2), state).float())
        assert torch.allclose(outs[0], outs[1], atol=0.05, rtol=0.02), (step, (outs[0] - outs[1]).abs().max())
        top2 = outs[1].topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > 0.1  # a near tie may fall either way under other rounding
        assert torch.equal(outs[0].argmax(-1)[clear], outs[1].argmax(-1)[clear]), step
        tokens = outs[0].argmax(-1)


def test_prefill_in_chunks_gives_the_same_texts(tiny_lm, tokenizer, tiny_run):
    """A batch prefilled one user at a time (caches padded to the batch's width) samples what one prefill does."""
    from dataclasses import replace

    prompts = _prompts(tiny_run, tokenizer, 4)
    prompts[1] = prompts[1][: len(prompts[1]) // 2]  # prompts of different lengths: chunks narrower than the batch
    sampler = FastSampler(tiny_lm, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    settings = SamplerSettings(n_samples=2, max_new_tokens=10, greedy=True)
    whole = sampler.sample(prompts, settings, batch_generator(0, 0))
    chunked = sampler.sample(prompts, replace(settings, prefill_chunk_tokens=1), batch_generator(0, 0))
    assert [[c.token_ids for c in u] for u in chunked] == [[c.token_ids for c in u] for u in whole]
    ids, mask = pad(prompts, tokenizer.pad_token_id, left=False)
    k_whole, _, first_whole = sampler.fast.prefill(ids, mask.sum(-1))
    k_chunked, _, first_chunked = sampler._prefill(prompts, ids, mask.sum(-1), chunk_tokens=1)
    assert torch.allclose(first_chunked, first_whole, atol=1e-4)
    length = len(prompts[1])
    assert torch.allclose(k_chunked[0][1, :, :length], k_whole[0][1, :, :length], atol=1e-5)


def test_our_prefill_of_real_tokens_only_equals_the_model_forward(tiny_lm, tokenizer, tiny_run):
    """Our prefill passes only the prompts' real tokens through the layers (the pads join for the attention alone);
    on prompts of different lengths its caches and first logits equal the model's own padded forward (fp32)."""
    prompts = _prompts(tiny_run, tokenizer, 3)
    prompts[0] = prompts[0][: len(prompts[0]) // 3]  # right padding of two thirds for the first prompt
    fast = FastLlama(tiny_lm)
    ids, mask = pad(prompts, tokenizer.pad_token_id, left=False)
    lengths = mask.sum(-1)
    keys, values, first = fast._prefill_fused(ids, lengths)
    model_keys, model_values, model_first = fast._prefill_model(ids, lengths)
    assert torch.allclose(first, model_first, atol=2e-3)
    for layer in (0, len(keys) - 1):
        for u, length in enumerate(lengths.tolist()):
            assert torch.allclose(keys[layer][u, :, :length], model_keys[layer][u, :, :length], atol=1e-4), (layer, u)
            assert torch.allclose(values[layer][u, :, :length], model_values[layer][u, :, :length], atol=1e-4), (layer, u)
            assert not keys[layer][u, :, length:].any()  # pads: zeros, masked in decoding
