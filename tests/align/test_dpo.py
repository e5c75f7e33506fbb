import os

import pandas as pd
import pytest
import torch

from dpo4rec.align.dpo import adapter_chain, run_align_stage
from dpo4rec.reward.pairs import make_pairs, reward_spread
from dpo4rec.config import AlignConfig, ModelConfig
from dpo4rec.errors import InputError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LIKES = "This user loves old musicals and family dramas with warm, hopeful endings."
DISLIKES = "asdf qwer zxcv lorem ipsum random words here."


def test_pairs_take_best_and_worst_and_skip_ties():
    rewards = pd.DataFrame({
        "user_index": [0, 0, 0, 0, 1, 1, 1],
        "sample": [0, 1, 2, 3, 0, 1, 2],
        "reward": [0.9, 0.2, 0.8, 0.5, 0.1, 0.4, 0.4],
    })
    knowledge = rewards[["user_index", "sample"]].assign(text=[f"t{u}{s}" for u, s in zip(rewards["user_index"], rewards["sample"])])
    prompts = pd.DataFrame({"user_index": [0, 1], "message": ["p0", "p1"]})
    pairs = make_pairs(rewards, knowledge, prompts, min_gap=1e-6)
    assert len(pairs) == 1  # user 1's samples tie
    row = pairs.iloc[0]
    assert (row["chosen"], row["rejected"], row["prompt"]) == ("t02", "t01", "p0")  # greedy (0.9) never competes
    assert row["reward_chosen"] == 0.8 and row["reward_rejected"] == 0.2
    spread = reward_spread(rewards)
    assert spread["users_with_tied_samples"] == 1 and spread["best_minus_worst_mean"] == pytest.approx(0.3)


def _write_pairs(run, round_index, n=4):
    folder = run / f"round_{round_index}" / "reward"
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({
        "user_index": range(n), "prompt": [f"Describe the taste of user {i} who watched musicals." for i in range(n)],
        "chosen": [LIKES] * n, "rejected": [DISLIKES] * n,
        "reward_chosen": [0.8] * n, "reward_rejected": [0.2] * n,
    }).to_parquet(folder / "pairs.parquet")


def _logp(model, tokenizer, prompt, answer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = model(ids).logits.float()
    return torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).sum().item()


@pytest.mark.slow
def test_dpo_moves_the_policy_and_round_1_references_round_0(tmp_path):
    from dpo4rec.llm import load_model, load_tokenizer

    model_cfg = ModelConfig(dtype="fp32")
    align = AlignConfig(learning_rate=2e-3, batch_size=2, grad_accumulation=1, epochs=2, max_length=128, lora_r=8)
    _write_pairs(tmp_path, 0)
    result = run_align_stage(tmp_path, 0, model_cfg, align)
    folder, log, reused = result.folder, result.summary, result.reused
    assert not reused and (folder / "adapter_model.safetensors").is_file() and (folder / "manifest.json").is_file()
    assert log["reference"] == "base model" and len(log["steps"]) == 4
    assert log["steps"][-1]["loss"] < log["steps"][0]["loss"]
    assert log["steps"][-1]["rewards/margins"] > log["steps"][0]["rewards/margins"]

    tokenizer = load_tokenizer("smollm2-135m")
    base = load_model("smollm2-135m", dtype=torch.float32)
    policy = load_model("smollm2-135m", adapters=[folder], dtype=torch.float32)
    prompt = "Describe the taste of user 0 who watched musicals."
    moved = (_logp(policy, tokenizer, prompt, LIKES) - _logp(policy, tokenizer, prompt, DISLIKES)) - (
        _logp(base, tokenizer, prompt, LIKES) - _logp(base, tokenizer, prompt, DISLIKES))
    assert moved > 1.0  # DPO raised the chosen text's likelihood relative to the rejected one

    # round 1 starts from round 0's policy: its fresh adapter is zero, so if the
    # reference is that same policy the first step's implicit rewards are ~0
    _write_pairs(tmp_path, 1)
    assert adapter_chain(tmp_path, 1) == [folder]
    log1 = run_align_stage(tmp_path, 1, model_cfg, align).summary
    first = log1["steps"][0]
    assert abs(first["rewards/chosen"]) < 1e-3 and abs(first["rewards/rejected"]) < 1e-3
    assert "round_0" in log1["reference"]
    assert run_align_stage(tmp_path, 1, model_cfg, align).reused

    with pytest.raises(InputError, match="rounds 0..2 aligned first"):
        adapter_chain(tmp_path, 3)


@pytest.mark.slow
def test_sft_term_and_top_layer_lora(tmp_path):
    """sft_weight adds the chosen answers' NLL to the loss and keeps them likely; lora_layers adapts the last layers only,
    in round 0 and in a round whose model already carries an adapter."""
    from safetensors.torch import load_file

    from dpo4rec.llm import load_model, load_tokenizer

    model_cfg = ModelConfig(dtype="fp32")
    align = AlignConfig(learning_rate=2e-3, batch_size=2, grad_accumulation=1, epochs=2, max_length=128, lora_r=8,
                        sft_weight=1.0, lora_layers=2)
    for round_index in (0, 1):
        _write_pairs(tmp_path, round_index)
        result = run_align_stage(tmp_path, round_index, model_cfg, align)
        folder, log = result.folder, result.summary
        layers = {int(name.split(".layers.")[1].split(".")[0]) for name in load_file(folder / "adapter_model.safetensors")}
        assert layers == {28, 29}  # SmolLM2-135M has 30 decoder layers
        # every policy step started at layer 28 from the reference pass's states: each pair's row, once per epoch
        assert log["frozen_layers"] == {"policy_rows_from_layer": 28, "rows_recorded": log["pairs"], "policy_rows_reused": 2 * log["pairs"]}
        assert log["steps"][0]["loss"] > 0.693 + 1.0  # ln 2 of DPO plus the chosen texts' NLL per token (several nats)
    tokenizer = load_tokenizer("smollm2-135m")
    base = load_model("smollm2-135m", dtype=torch.float32)
    policy = load_model("smollm2-135m", adapters=[tmp_path / "round_0" / "align"], dtype=torch.float32)
    prompt = "Describe the taste of user 0 who watched musicals."
    assert _logp(policy, tokenizer, prompt, LIKES) > _logp(base, tokenizer, prompt, LIKES) + 1.0
    _write_pairs(tmp_path / "other", 0)
    with pytest.raises(InputError, match="align.lora_layers must be at most the model's 30 decoder layers"):
        run_align_stage(tmp_path / "other", 0, model_cfg, AlignConfig(lora_layers=31))
    assert not (tmp_path / "other" / "round_0" / "align").exists()


def test_completion_only_scoring_gives_the_same_log_probs(monkeypatch):
    """The CPU speed-up scores only completion positions; their log-probs must not change."""
    import trl.trainer.utils as trl_utils

    from dpo4rec.align.dpo import _score_completion_tokens_only
    from dpo4rec.llm import load_model, load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    model = load_model("smollm2-135m", dtype=torch.float32)
    trl_utils.add_fused_lm_head(model)
    batch = tokenizer([f"Prompt about musicals. {LIKES}", f"A longer prompt about films and music. {DISLIKES}"],
                      return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :6] = -100  # the "prompt"
    scored = {}
    with torch.no_grad():
        for compact in (False, True):
            monkeypatch.setattr(trl_utils, "_use_triton", lambda device, compact=compact: compact)
            scored[compact] = model(**batch, labels=labels, fused_lm_head=True).log_probs
    assert (scored[True] != 0).sum() == (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(scored[True], scored[False], atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: False)
    monkeypatch.setattr(trl_utils, "_dpo4rec_compact", False, raising=False)
    _score_completion_tokens_only()
    assert trl_utils._use_triton(torch.device("cpu"))


def test_a_round_without_pairs_keeps_its_model(tmp_path):
    """All samples tied: the round writes an adapter that changes nothing, so later rounds still chain."""
    from dpo4rec.llm import load_model, load_tokenizer

    _write_pairs(tmp_path, 0, n=0)
    result = run_align_stage(tmp_path, 0, ModelConfig(dtype="fp32"), AlignConfig())
    folder, log = result.folder, result.summary
    assert log["pairs"] == 0 and log["steps"] == [] and "tied" in log["skipped"]
    assert adapter_chain(tmp_path, 1) == [folder]
    tokenizer = load_tokenizer("smollm2-135m")
    ids = tokenizer("A user who likes musicals.", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        same = load_model("smollm2-135m", adapters=[folder], dtype=torch.float32)(ids).logits
        base = load_model("smollm2-135m", dtype=torch.float32)(ids).logits
    torch.testing.assert_close(same, base)
