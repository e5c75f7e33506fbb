"""The new reward options, the pair builder and the held-out check, against hand-computed values."""

import math
import os

import numpy as np
import pandas as pd
import pytest
import torch

from dpo4rec.heldout.stage import answer_logps, completion_ids, net_log_ratio, pair_margins, summarize
from dpo4rec.reward.pairs import make_pairs, reward_spread
from dpo4rec.stats import paired_bootstrap
from dpo4rec.reward.reliability import agreement
from dpo4rec.errors import InputError
from dpo4rec.recommend.features import ListTensors
from dpo4rec.reward.scorers import TEXT_MATCH_TEMPERATURE, TextMatchScorer, list_rewards

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _BCE:
    """The base re-ranker's per-list log-likelihood (mean Bernoulli), as a plain object."""

    def list_log_likelihood(self, scores, labels):
        from dpo4rec.recommend.models.base import Reranker

        return Reranker.list_log_likelihood(self, scores, labels)


def test_list_rewards_by_hand():
    scores = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 2.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    # list 0 ranks its positive first: NDCG 1; list 1 ranks it third: DCG 1/log2(4) = 0.5, ideal 1
    ndcg = list_rewards("ndcg", scores, labels, _BCE(), k=5)
    np.testing.assert_allclose(ndcg, [1.0, 0.5])
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # log-likelihood: mean over items of log sigmoid(s) for positives, log sigmoid(-s) for negatives
    expected = [np.mean([math.log(sigmoid(2)), math.log(sigmoid(0)), math.log(sigmoid(-1))]),
                np.mean([math.log(sigmoid(0)), math.log(sigmoid(-1)), math.log(sigmoid(-2))])]
    np.testing.assert_allclose(list_rewards("loglik", scores, labels, _BCE()), expected, rtol=1e-6)
    # two texts that tie under NDCG@5 (same ranking) differ under the continuous rewards
    wider = torch.tensor([[4.0, 0.0, 1.0]])
    assert list_rewards("ndcg", wider, labels[:1], _BCE())[0] == ndcg[0]
    assert list_rewards("loglik", wider, labels[:1], _BCE())[0] > expected[0]


def test_listwise_reward_by_hand():
    scores = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 2.0], [1.0, 0.0, 3.0], [1.0, 2.0, 0.0], [1.0, 2.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    lse = lambda row: math.log(sum(math.exp(x) for x in row))  # noqa: E731
    expected = [2 - lse([2, 0, 1]), 0 - lse([0, 1, 2]), np.mean([1 - lse([1, 0, 3]), 3 - lse([1, 0, 3])])]
    values = list_rewards("listwise", scores, labels, _BCE())
    np.testing.assert_allclose(values[:3], expected, rtol=1e-6)
    # a list of positives only (or none) has no order to get right: no value
    assert np.isnan(values[3:]).all()
    # a shift of every score changes the order of nothing: listwise stays, loglik moves (the calibration it also reads)
    np.testing.assert_allclose(list_rewards("listwise", scores[:3] + 1.5, labels[:3], _BCE()), expected, rtol=1e-5)
    assert not np.allclose(list_rewards("loglik", scores[:3] + 1.5, labels[:3], _BCE()), list_rewards("loglik", scores[:3], labels[:3], _BCE()))


def test_text_match_reward_by_hand():
    # items 1..4 as unit vectors in 2-d; user 0 has two reward lists and one train list (never scored)
    item_index = np.array([1, 2, 3, 4])
    item_vectors = np.array([[1, 0], [0, 1], [1, 1], [3, -4]], dtype=np.float32)  # 3 and 4 are not unit: cosine normalizes
    lists = ListTensors(items=torch.tensor([[1, 2, 3], [4, 2, 1], [1, 2, 3]]),
                        labels=torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 1.0]]),
                        history=torch.zeros(3, 2, dtype=torch.long), user_index=torch.tensor([0, 0, 0]),
                        split=np.array(["reward", "reward", "train"]))
    scorer = TextMatchScorer(item_index, item_vectors, lists)
    texts = np.array([[2.0, 0.0], [0.0, 1.0]], dtype=np.float32)  # a text along item 1, one along item 2
    rewards = scorer.score(np.array([0, 0]), texts, split="reward", reward="listwise")
    lse = lambda row: math.log(sum(math.exp(x / TEXT_MATCH_TEMPERATURE) for x in row))  # noqa: E731
    r2 = 1 / math.sqrt(2)
    along_1 = np.mean([1 / TEXT_MATCH_TEMPERATURE - lse([1, 0, r2]), 0 - lse([0.6, 0, 1])])   # cos(item 4, e1) = 3/5
    along_2 = np.mean([0 - lse([0, 1, r2]), 1 / TEXT_MATCH_TEMPERATURE - lse([-0.8, 1, 0])])  # cos(item 4, e2) = -4/5
    np.testing.assert_allclose(rewards, [along_1, along_2], rtol=1e-5)
    # NDCG@5: the text along item 1 puts list 0's positive first and list 1's last (after items 1 and 4)
    ndcg = scorer.score(np.array([0]), texts[:1], split="reward", reward="ndcg")
    np.testing.assert_allclose(ndcg, [(1.0 + 1 / math.log2(4)) / 2])
    # the same text always gets the same reward (nothing is trained, nothing is random), and other lists give another
    np.testing.assert_array_equal(scorer.score(np.array([0, 0]), texts, split="reward", reward="listwise"), rewards)
    with pytest.raises(InputError, match="loglik"):
        scorer.score(np.array([0]), texts[:1], split="reward", reward="loglik")
    with pytest.raises(InputError, match="item_index 4"):
        TextMatchScorer(item_index[:3], item_vectors[:3], lists)
    with pytest.raises(InputError, match="dimension 2"):
        scorer.score(np.array([0]), np.ones((1, 3), np.float32), split="reward", reward="listwise")


def _table(rewards):
    rows = [(u, s, r) for u, values in rewards.items() for s, r in enumerate(values)]
    frame = pd.DataFrame(rows, columns=["user_index", "sample", "reward"])
    knowledge = frame[["user_index", "sample"]].assign(text=[f"u{u}s{s}" for u, s in zip(frame["user_index"], frame["sample"])],
                                                       n_tokens=[10 + s for s in frame["sample"]])
    prompts = pd.DataFrame({"user_index": list(rewards), "message": [f"p{u}" for u in rewards]})
    return frame, knowledge, prompts


def test_pairings_by_hand():
    # sample 0 is greedy (never a candidate); user 1 has a NaN (no list with a positive) and a tie
    frame, knowledge, prompts = _table({0: [9.0, 0.1, 0.4, 0.3, 0.2], 1: [0.0, 0.5, np.nan, 0.5, 0.2]})
    best_worst = make_pairs(frame, knowledge, prompts, "best_worst")
    assert list(zip(best_worst["user_index"], best_worst["sample_chosen"], best_worst["sample_rejected"])) == [(0, 2, 1), (1, 1, 4)]
    assert best_worst.loc[0, "prompt"] == "p0" and best_worst.loc[0, "chosen"] == "u0s2" and best_worst.loc[0, "tokens_rejected"] == 11
    all_gaps = make_pairs(frame, knowledge, prompts, "all_gaps", min_gap=0.15)
    # gaps > 0.15: user 0: 2-1 (0.3), 2-4 (0.2), 3-1 (0.2); user 1: 1-4 and 3-4 (0.3 each), 1-3 tie
    assert sorted(zip(all_gaps["user_index"], all_gaps["sample_chosen"], all_gaps["sample_rejected"])) == [
        (0, 2, 1), (0, 2, 4), (0, 3, 1), (1, 1, 4), (1, 3, 4)]
    assert (all_gaps["reward_chosen"] - all_gaps["reward_rejected"] > 0.15).all()
    spread = reward_spread(frame, best_worst)
    assert spread["users_without_reward"] == 1 and spread["users_with_tied_samples"] == 0
    assert spread["best_minus_worst_mean"] == pytest.approx((0.3 + 0.3) / 2)
    assert spread["chosen_tokens_mean"] == pytest.approx((12 + 11) / 2)


def test_heldout_margins_and_summary_by_hand():
    # per-text log-ratios (policy - reference): user 0: s1 +0.2, s2 0, s3 -0.1; user 1: s1 +0.5, s2 +0.5; user 2: s1 0, s2 +1
    texts = pd.DataFrame({"user_index": [0, 0, 0, 1, 1, 2, 2], "sample": [1, 2, 3, 1, 2, 1, 2],
                          "policy": [-9.8, -10.0, -10.1, -4.5, -5.5, -3.0, -2.0],
                          "reference": [-10.0, -10.0, -10.0, -5.0, -6.0, -3.0, -3.0]})
    pairs = pd.DataFrame({"user_index": [0, 0, 0, 1, 2], "sample_chosen": [1, 1, 2, 2, 1], "sample_rejected": [3, 2, 3, 1, 2],
                          "reward_chosen": [0.9, 0.9, 0.5, 0.7, 0.6], "reward_rejected": [0.1, 0.5, 0.1, 0.2, 0.5]})
    scored = pair_margins(pairs, texts, beta=0.1)
    np.testing.assert_allclose(scored["margin"], [0.1 * 0.3, 0.1 * 0.2, 0.1 * 0.1, 0.0, 0.1 * -1.0], atol=1e-9)
    assert list(scored["best_worst"]) == [True, False, False, True, True]  # each user's widest reward gap
    summary = summarize(scored, seed=0)
    # right, right, right | tie (half) | wrong: pooled over pairs as the bootstrap pools lists
    assert summary["heldout_pair_accuracy"] == pytest.approx((1 + 1 + 1 + 0.5 + 0) / 5)
    assert summary["best_worst_accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert summary["ties"] == 1 and summary["users"] == 3 and summary["pairs"] == 5
    # resampling the three users: all three draws user 2 (accuracy 0) or all user 0 (accuracy 1) each come 1 time in 27,
    # more than the 2.5% in either tail, so the interval is exactly [0, 1]
    assert summary["heldout_pair_accuracy_ci95"] == pytest.approx([0.0, 1.0])
    everyone_right = summarize(pd.DataFrame({"user_index": [0, 1, 2], "margin": [1.0, 2.0, 0.5]}))
    assert everyone_right["heldout_pair_accuracy"] == 1.0 and everyone_right["heldout_pair_accuracy_ci95"] == [1.0, 1.0]


def test_heldout_guards_net_of_sharpening_and_length_by_hand():
    """The log-ratio is built as 2 x reference log-prob + 3 x tokens + e (all centred within users), with e orthogonal to
    both: the net log-ratio is e, and its pairs are scored by e alone."""
    e = [1.0, -2.0, 1.0, -1.0, 2.0, -1.0]
    texts = pd.DataFrame({"user_index": [0, 0, 0, 1, 1, 1], "sample": [1, 2, 3, 1, 2, 3],
                          "reference": [-11.0, -10.0, -9.0, -5.0, -5.0, -5.0], "n_answer_tokens": [10, 10, 10, 9, 10, 11]})
    ratio = [-1.0 + 7, -2.0 + 7, 3.0 + 7, -4.0, 2.0, 2.0]  # user 0: 2 x (-1, 0, 1) + e; user 1: 3 x (-1, 0, 1) + e; + a user constant
    texts["policy"] = texts["reference"] + ratio
    np.testing.assert_allclose(net_log_ratio(texts).to_numpy(), e, atol=1e-9)
    pairs = pd.DataFrame({"user_index": [0, 0, 1, 1], "sample_chosen": [1, 2, 2, 3], "sample_rejected": [2, 3, 1, 2],
                          "reward_chosen": [0.9, 0.5, 0.8, 0.6], "reward_rejected": [0.5, 0.1, 0.2, 0.4]})
    scored = pair_margins(pairs, texts, beta=0.5)
    np.testing.assert_allclose(scored["margin"], [0.5 * 1, 0.5 * -5, 0.5 * 6, 0.0], atol=1e-9)
    np.testing.assert_allclose(scored["net_margin"], [0.5 * 3, 0.5 * -3, 0.5 * 3, 0.5 * -3], atol=1e-9)
    np.testing.assert_allclose(scored["reference_margin"], [-1, -1, 0, 0], atol=1e-9)
    summary = summarize(scored)
    assert summary["heldout_pair_accuracy"] == pytest.approx((1 + 0 + 1 + 0.5) / 4)
    assert summary["net_pair_accuracy"] == pytest.approx((1 + 0 + 1 + 0) / 4)
    assert summary["reference_pair_accuracy"] == pytest.approx((0 + 0 + 0.5 + 0.5) / 4)
    assert summary["net_pair_accuracy_ci95"] == pytest.approx([0.5, 0.5])  # each user's own net accuracy is 0.5
    assert "net_pair_accuracy" not in summarize(pair_margins(pairs, texts.drop(columns="n_answer_tokens"), beta=0.5))


def test_shared_prompt_log_probs_equal_a_full_forward():
    """answer_logps (one packed row: the prompt once, each answer a branch) against one plain forward per text; with
    LoRA on the top layers, a reference pass that starts from the policy pass's recorded states gives the numbers
    of a full reference pass."""
    from dpo4rec.llm import load_model, load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    model = load_model("smollm2-135m", dtype=torch.float32)
    prompt = "A user who loves musicals and westerns from the fifties."
    answers = ["Musicals and warm family films.", "Horror.", "Westerns with long, quiet landscapes and a lonely hero."]
    ids = [completion_ids(tokenizer, prompt, a) for a in answers]
    shared = answer_logps(model, ids[0][0], [a for _, a in ids])
    for (prompt_ids, answer), value in zip(ids, shared):
        full = torch.tensor([prompt_ids + answer])
        with torch.inference_mode():
            logits = model(full).logits[0, len(prompt_ids) - 1 : -1].float()
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(answer)[:, None]).sum().item()
        assert value == pytest.approx(expected, abs=1e-3)

    from peft import LoraConfig, get_peft_model

    from dpo4rec.align.frozen_layers import FrozenLayers

    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[29]))
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    frozen = FrozenLayers(peft)
    policy = answer_logps(peft.get_base_model(), ids[0][0], [a for _, a in ids], frozen)  # records the states below layer 29
    with peft.disable_adapter():
        reference = answer_logps(peft.get_base_model(), ids[0][0], [a for _, a in ids], frozen)
    assert frozen.start == 29 and len(frozen.states) == 1
    np.testing.assert_allclose(reference, shared, rtol=0, atol=1e-4)  # the base model's numbers, from layer 29 on
    assert np.abs(policy - reference).max() > 0.01  # the adapter changed them


def test_validation_drift_by_hand():
    from dpo4rec.drift.stage import sampled_drift

    before = pd.DataFrame({"user_index": [0, 0, 0, 1, 1, 1, 2, 2], "sample": [0, 1, 2, 0, 1, 2, 1, 2],
                           "reward": [9.0, 0.2, 0.4, 9.0, 0.5, np.nan, 0.1, 0.1]})
    after = pd.DataFrame({"user_index": [0, 0, 1, 1, 3], "sample": [1, 2, 1, 2, 1], "reward": [0.5, 0.7, 0.4, 0.6, 0.9]})
    drift = sampled_drift(before, after)
    # user 0: 0.6 - 0.3 = +0.3; user 1: 0.5 - 0.5 (its NaN sample left out) = 0; users 2 and 3 are on one side only
    assert drift["users"] == 2
    assert drift["validation_reward_drift"] == pytest.approx((0.3 + 0.0) / 2)
    assert drift["before"] == pytest.approx(0.4) and drift["after"] == pytest.approx(0.55)
    low, high = drift["validation_reward_drift_ci95"]
    assert low == pytest.approx(0.0) and high == pytest.approx(0.3)  # resampling two users: 0, 0.15 or 0.3
    assert sampled_drift(before, after[after["user_index"] == 3]) == {}


def test_split_half_agreement_by_hand():
    def table(rewards):
        return pd.DataFrame([(u, s + 1, r) for u, values in rewards.items() for s, r in enumerate(values)],
                            columns=["user_index", "sample", "reward"])

    a = table({0: [0.1, 0.3, 0.2], 1: [0.5, 0.5, 0.5], 2: [0.1, 0.2]})
    b = table({0: [0.2, 0.4, 0.4], 1: [0.1, 0.2, 0.3], 2: [0.3, 0.1]})
    out = agreement(a, b)
    # user 0: (1,2) and (1,3) ordered alike, (2,3) tied on b (half); user 1 ties on a (no pair); user 2 reversed
    assert out["users"] == 3 and out["tied_users"] == 1
    assert out["pair_agreement"] == pytest.approx((1 + 1 + 0.5 + 0) / 4) and out["pair_agreement_pairs"] == 4
    # best vs worst on a: user 0 (sample 2 vs 1) holds on b, user 2 (sample 2 vs 1) does not
    assert out["best_worst_agreement"] == pytest.approx(0.5) and out["best_worst_agreement_pairs"] == 2
    # the interval resamples users with their pairs: user 0's mean agreement (2.5 / 3) and user 2's (0), 4 pairs in all
    users, hits = np.array([0, 0, 0, 2]), np.array([1, 1, 0.5, 0])
    assert out["pair_agreement_ci95"] == pytest.approx(list(paired_bootstrap(users, hits, np.zeros(4))[1]))
    assert out["pair_agreement_ci95"][0] == pytest.approx(0.0) and out["pair_agreement_ci95"][1] == pytest.approx(2.5 / 3)
