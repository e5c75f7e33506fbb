"""DPO with each prompt evaluated once gives TRL's per-token log-probs, gradients and loss (fp32)."""

import os

import pandas as pd
import pytest
import torch

from dpo4rec.align.shared_prompt import pack_pairs

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PAD = 0


def trl_batch(examples, max_length=None):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    batch = DataCollatorForPreference(pad_token_id=PAD, max_length=max_length)(examples)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return batch["input_ids"], batch["attention_mask"], labels


def test_packed_rows_by_hand():
    ids, mask, labels = trl_batch([{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10]},
                                   {"prompt_ids": [11, 12], "chosen_ids": [13], "rejected_ids": [14, 15, 16]}])
    packed = pack_pairs(ids, mask, labels, PAD)
    # prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected, then padding
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 7, 10], [11, 12, 13, 12, 14, 15, 16]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 1, 2, 1, 2, 3, 4]]
    assert packed["shift_labels"].tolist() == [[-100, -100, 8, 9, -100, 10, -100], [-100, 13, -100, 14, 15, 16, -100]]
    visible = packed["attention_mask"][0, 0].int().tolist()
    assert visible[5] == [1, 1, 0, 0, 0, 1, 0]  # the rejected branch sees the shared prompt and itself, not the chosen answer
    assert visible[4] == [1, 1, 1, 1, 1, 0, 0]
    # TRL's shifted layout, row-major: chosen rows then rejected rows; each entry a flat packed index
    assert packed["source"].tolist() == [2, 3, 7 + 1, 5, 7 + 3, 7 + 4, 7 + 5]


def test_padding_attends_only_to_itself():
    ids, mask, labels = trl_batch([{"prompt_ids": [5, 6, 7, 8], "chosen_ids": [9, 10, 11], "rejected_ids": [12]},
                                   {"prompt_ids": [13, 14], "chosen_ids": [15], "rejected_ids": [16]}])
    visible = pack_pairs(ids, mask, labels, PAD)["attention_mask"][1, 0]
    assert visible.shape == (9, 9)
    assert visible[6:].int().tolist() == [[0] * i + [1] + [0] * (8 - i) for i in range(6, 9)]
    assert not visible[:6, 6:].any()


def test_truncated_rows_keep_their_alignment():
    ids, mask, labels = trl_batch([{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 10, 11], "rejected_ids": [12, 13]}], max_length=5)
    packed = pack_pairs(ids, mask, labels, PAD)  # chosen cut to [8, 9]; rejected fits
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 7, 12, 13]]
    assert packed["source"].tolist() == [2, 3, 5, 6]


def test_pairs_of_one_prompt_share_a_row_and_each_answer_runs_once():
    # a user's three pairs (answer 8 in two of them) and another user's pair
    ids, mask, labels = trl_batch([{"prompt_ids": [5, 6], "chosen_ids": [8], "rejected_ids": [9, 10]},
                                   {"prompt_ids": [5, 6], "chosen_ids": [8], "rejected_ids": [11]},
                                   {"prompt_ids": [5, 6], "chosen_ids": [12], "rejected_ids": [9, 10]},
                                   {"prompt_ids": [3], "chosen_ids": [4], "rejected_ids": [7]}])
    packed = pack_pairs(ids, mask, labels, PAD)
    # prompt[:-1] | prompt[-1] 8 | prompt[-1] 9 10 | prompt[-1] 11 | prompt[-1] 12: four distinct answers, one prompt
    assert packed["input_ids"].tolist() == [[5, 6, 8, 6, 12, 6, 9, 10, 6, 11], [3, 4, 3, 7, PAD, PAD, PAD, PAD, PAD, PAD]]
    assert packed["pair_layout"] == [(1, 2, 2, 3, 2), (0, 2, 2)]
    assert packed["position_ids"][0].tolist() == [0, 1, 2, 1, 2, 1, 2, 3, 1, 2]
    visible = packed["attention_mask"][0, 0].int().tolist()
    assert visible[7] == [1, 0, 0, 0, 0, 1, 1, 1, 0, 0]  # answer 9 10 sees the shared prompt and its own branch only
    # TRL's rows: chosen 8, 8, 12, 4, then rejected 9 10, 11, 9 10, 7; each a flat index into the packed rows
    assert packed["source"].tolist() == [1, 1, 3, 10 + 0, 5, 6, 8, 5, 6, 10 + 2]


@pytest.mark.parametrize("seed", [0, 1])
def test_sampler_keeps_a_prompts_pairs_together(seed):
    from dpo4rec.align.shared_prompt import PromptGroupedSampler

    prompts = [[1, 2], [1, 2], [3], [1, 2], [4, 5], [3]]
    sampler = PromptGroupedSampler(prompts, seed)
    orders = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(6))
        keys = [tuple(prompts[i]) for i in order]
        assert sum(1 for a, b in zip(keys, keys[1:]) if a != b) == 2  # three prompts, each in one run
        orders.append(order)
    assert len({tuple(o) for o in orders}) > 1  # another order in another epoch
    sampler.set_epoch(0)
    assert list(sampler) == orders[0]  # and the same order for the same seed and epoch


def test_one_pair_per_prompt_keeps_the_trainers_own_order():
    from accelerate.data_loader import SeedableRandomSampler

    from dpo4rec.align.shared_prompt import PromptGroupedSampler

    ours, theirs = PromptGroupedSampler([[i] for i in range(50)], seed=3), SeedableRandomSampler(range(50), data_seed=3)
    for epoch in range(2):
        ours.set_epoch(epoch)
        theirs.set_epoch(epoch)
        assert list(ours) == list(theirs)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def fp32_model(request):
    """A random-init tiny Llama or Qwen2 (tests/conftest.py) with TRL's fused LM head, and the real tokenizer."""
    from trl.trainer.utils import add_fused_lm_head

    from dpo4rec.llm import load_tokenizer
    from tiny_models import tiny_causal_lm

    model = tiny_causal_lm(request.param)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model, load_tokenizer("smollm2-135m")


def real_examples(tokenizer):
    from dpo4rec.heldout.stage import completion_ids

    texts = [("A user who watched musicals and family dramas in the nineties, " * 4, "Loves musicals.", "Watches films of every kind, all the time."),
             ("Short prompt.", "Yes", "No, and then some more words about it"),
             ("A user who rated westerns highly and skipped horror.", "Westerns, clearly.", "Horror."),
             # the first user's second pair (its chosen answer again): one packed row, that answer evaluated once
             ("A user who watched musicals and family dramas in the nineties, " * 4, "Loves musicals.", "Action films.")]
    examples = []
    for prompt, chosen, rejected in texts:
        prompt_ids, chosen_ids = completion_ids(tokenizer, prompt, chosen)
        examples.append({"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": completion_ids(tokenizer, prompt, rejected)[1]})
    return examples


@pytest.mark.parametrize("segment_devices", [("cpu",), ()], ids=["segments", "block-mask"])  # CPUs' layout, GPUs'
def test_same_log_probs_and_gradients_as_two_rows(fp32_model, segment_devices, monkeypatch):
    from dpo4rec.align import shared_prompt
    from dpo4rec.align.shared_prompt import SharedPromptModel

    monkeypatch.setattr(shared_prompt, "SEGMENT_DEVICES", segment_devices)
    model, tokenizer = fp32_model
    ids, mask, labels = trl_batch(real_examples(tokenizer))
    results = []
    for forward in (model, SharedPromptModel(model, tokenizer.pad_token_id)):
        model.zero_grad()
        out = forward(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
        chosen, rejected = out.log_probs.sum(1).chunk(2)
        (chosen - 2 * rejected).sum().backward()  # a DPO-like signed sum, so both branches' gradients count
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith(("q_proj.weight", "down_proj.weight"))}
        results.append((out, grads))
    (plain, plain_grads), (shared, shared_grads) = results
    assert plain.log_probs.shape == shared.log_probs.shape
    assert (plain.log_probs != 0).sum() > 20
    torch.testing.assert_close(shared.log_probs, plain.log_probs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shared.entropy, plain.entropy, atol=1e-4, rtol=1e-4)
    assert torch.equal(shared.is_top1, plain.is_top1)
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0
        relative = ((shared_grads[name] - grad).norm() / grad.norm()).item()
        assert relative < 1e-4, (name, relative)


@pytest.mark.slow
def test_dpo_trainer_logs_the_same_losses(tmp_path):
    from dpo4rec.align.dpo import train_dpo
    from dpo4rec.config import AlignConfig, ModelConfig

    pairs = pd.DataFrame({"prompt": [f"Describe user {i}, who watched musicals and westerns." for i in range(4)],
                          "chosen": ["Musicals with warm endings, and classic westerns."] * 4,
                          "rejected": ["Movies. Many movies. They watched them all, one after another."] * 4})
    logs = []
    # TRL's layout; ours; ours with activation checkpointing (the segments' layout must reach the recomputed layers)
    for shared, checkpointing in ((False, False), (True, False), (True, True)):
        align = AlignConfig(learning_rate=5e-3, batch_size=2, grad_accumulation=1, epochs=1, shared_prompt=shared,
                            gradient_checkpointing=checkpointing)
        logs.append(train_dpo(pairs, ModelConfig(dtype="fp32"), align, [], tmp_path / f"{shared}-{checkpointing}")["steps"])
    assert len(logs[0]) == len(logs[1]) == len(logs[2]) == 2
    assert logs[0][1]["loss"] < logs[0][0]["loss"]  # the second step sees the first step's update
    for plain, *ours in zip(*logs):
        for shared in ours:
            for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
                assert shared[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-5), key


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def top_lora_model(request):
    """A random-init tiny Llama or Qwen2 (4 layers) in fp32 with LoRA on its last two layers only, B matrices
    random (so the adapter changes things)."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from dpo4rec.llm import load_tokenizer
    from tiny_models import tiny_causal_lm

    model = tiny_causal_lm(request.param, layers=4)
    add_fused_lm_head(model)
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[2, 3]))
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return peft, load_tokenizer("smollm2-135m")


@pytest.mark.parametrize("segment_devices", [("cpu",), ()], ids=["segments", "block-mask"])
def test_policy_passes_start_above_the_frozen_layers(top_lora_model, segment_devices, monkeypatch):
    """The reference pass records the hidden states entering layer 2 (of 4; the first adapted); policy passes on the
    same rows start there (layer 0 never runs) and give the log-probs and LoRA gradients of a pass through them all."""
    from dpo4rec.align import shared_prompt
    from dpo4rec.align.frozen_layers import FrozenLayers
    from dpo4rec.align.shared_prompt import SharedPromptModel

    monkeypatch.setattr(shared_prompt, "SEGMENT_DEVICES", segment_devices)
    model, tokenizer = top_lora_model
    frozen = FrozenLayers(model)
    assert frozen.start == 2
    ids, mask, labels = trl_batch(real_examples(tokenizer))
    plain, reusing = SharedPromptModel(model, tokenizer.pad_token_id), SharedPromptModel(model, tokenizer.pad_token_id, frozen)
    calls = []
    counter = model.get_base_model().model.layers[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad(), model.disable_adapter():  # the reference pass: every layer, and recorded
            reference = [forward(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
                         for forward in (plain, reusing)]
        assert len(frozen.states) == 3 and len(calls) == 2  # three prompts: three packed rows
        torch.testing.assert_close(reference[1], reference[0], atol=0, rtol=0)
        results = []
        for forward in (plain, reusing):
            model.zero_grad()
            calls.clear()
            out = forward(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
            chosen, rejected = out.log_probs.sum(1).chunk(2)
            (chosen - 2 * rejected).sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((out.log_probs.detach(), grads, len(calls)))
    finally:
        counter.remove()
    (full, full_grads, full_calls), (reused, reused_grads, reused_calls) = results
    assert full_calls == 1 and reused_calls == 0
    assert (full - reference[0]).abs().max() > 1e-3  # the adapter changes the log-probs: a real policy pass
    torch.testing.assert_close(reused, full, atol=1e-5, rtol=1e-5)
    assert len(full_grads) == 2 * 2 * 3 and set(full_grads) == set(reused_grads)  # A and B, 2 layers, 3 modules
    for name, grad in full_grads.items():
        assert grad.abs().sum() > 0
        assert ((reused_grads[name] - grad).norm() / grad.norm()).item() < 1e-5, name
    # a row never recorded runs every layer (and is recorded then)
    other = real_examples(tokenizer)[:1]
    other[0]["prompt_ids"] = other[0]["prompt_ids"][:-3] + other[0]["prompt_ids"][-2:]
    calls.clear()
    counter = model.get_base_model().model.layers[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            reusing(*trl_batch(other), fused_lm_head=True)
    finally:
        counter.remove()
    assert len(calls) == 1 and len(frozen.states) == 4
