"""SASRec on the next-item protocol: full-ranking metrics, the leave-one-out split, the causal mask, knowledge."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from dpo4rec.config import RecommendConfig
from dpo4rec.data.next_item import item_sequences, item_vocabulary, prompt_positions
from dpo4rec.errors import InputError
from dpo4rec.metrics import full_ranking_metrics, mean_metrics
from dpo4rec.recommend.features import user_knowledge
from dpo4rec.recommend.models import ModelSpec, build_model
from dpo4rec.recommend.sequential import (evaluate_next_item, length_buckets, next_item_data, next_item_targets, rank_targets, target_ranks,
                                          train_sequential)


def sasrec(n_items: int, knowledge_dim: int | None = None, max_len: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelSpec(backbone="sasrec", n_items=n_items, list_size=0, history_len=max_len, knowledge_dim=knowledge_dim,
                                 embed_dim=16, hidden_dim=16, n_heads=2, n_layers=2, dropout=0.0))


def test_ranks_break_ties_against_the_target_and_skip_seen_items_and_padding():
    # Items 1..6 (column 0 pads). Row 0: target 3 scores 0.5; items 1 (0.9) and 5 (0.5, a tie) count; item 2 (0.7) is seen.
    scores = torch.tensor([[9.0, 0.9, 0.7, 0.5, 0.1, 0.5, 0.2],
                           [9.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    ranks = target_ranks(scores, torch.tensor([3, 6]), [np.array([2]), np.array([6, 1])])
    assert ranks.tolist() == [2, 0]  # row 1: its target was seen before (a repeat) and still competes, first
    metrics = full_ranking_metrics(ranks.numpy(), ks=(1, 3))
    assert metrics["hr@1"].tolist() == [0.0, 1.0]
    assert metrics["hr@3"].tolist() == [1.0, 1.0]
    assert metrics["ndcg@3"] == pytest.approx([1 / math.log2(4), 1.0])
    assert metrics["ndcg@1"].tolist() == [0.0, 1.0]
    # All tied: the target ranks last among the candidates that are not seen (5 others of 6 items).
    assert target_ranks(torch.zeros(1, 7), torch.tensor([4]), [np.array([], np.int64)]).tolist() == [5]


def test_leave_one_out_keeps_both_targets_out_of_every_input():
    sequences = [np.array([1, 2, 3, 4, 5]), np.array([6, 7, 8]), np.array([9, 10, 11, 12])]
    data = next_item_data(sequences, max_len=3)
    for row, user in enumerate(data.train_users.tolist()):
        train = set(data.train_items[row].tolist()) - {0}
        assert train == set(sequences[user][:-2].tolist())  # the training sequence stops before the validation target
    assert 1 not in data.train_users.tolist()  # one item before its validation target: nothing to learn from
    assert data.validation.target.tolist() == [4, 7, 11]
    assert data.test.target.tolist() == [5, 8, 12]
    for targets, cut in ((data.validation, 2), (data.test, 1)):
        for row, seq in enumerate(sequences):
            shown = set(targets.items[row].tolist()) - {0}
            assert targets.target[row].item() not in shown and int(seq[-1]) not in shown
            assert shown == set(seq[: len(seq) - cut][-3:].tolist())  # the last max_len items before the target
            assert set(targets.seen[row].tolist()) == set(seq[: len(seq) - cut].tolist())  # the whole history is excluded
    with pytest.raises(InputError, match="at least 3"):
        next_item_data([np.array([1, 2])], max_len=3)


def test_the_prompt_history_ends_before_the_validation_target():
    first, end = prompt_positions(np.array([5, 40]), cap=15)
    assert first.tolist() == [0, 23] and end.tolist() == [3, 38]  # positions 3, 4 (and 38, 39) are the targets


def test_sequences_follow_the_table_order_per_user():
    inter = pd.DataFrame({"user_id": [7, 7, 7, 3, 3, 3], "item_id": ["b", "a", "c", "c", "b", "a"]})
    users, sequences = item_sequences(inter, item_vocabulary(inter["item_id"]))
    assert users.tolist() == [7, 3]
    assert [s.tolist() for s in sequences] == [[2, 1, 3], [3, 2, 1]]


def test_a_later_item_leaves_earlier_positions_unchanged():
    model = sasrec(20).eval()
    items = torch.tensor([[3, 5, 7, 9, 11]])
    lengths = torch.tensor([5])
    changed = items.clone()
    changed[0, 3] = 15
    with torch.no_grad():
        before, after = model.encode(items, lengths), model.encode(changed, lengths)
    torch.testing.assert_close(before[:, :3], after[:, :3])
    assert not torch.allclose(before[:, 3:], after[:, 3:])
    # Padding after a sequence changes nothing either: batches are padded to their longest row.
    padded = torch.tensor([[3, 5, 7, 9, 11, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(model(padded, lengths), model(items, lengths))


def test_knowledge_changes_the_scores():
    model = sasrec(20, knowledge_dim=6).eval()
    model.item_knowledge.copy_(torch.randn(21, 6, generator=torch.Generator().manual_seed(1)))
    items, lengths = torch.tensor([[3, 5, 7]]), torch.tensor([3])
    user_a, user_b = torch.randn(1, 6), torch.randn(1, 6)
    with torch.no_grad():
        a, b = model(items, lengths, user_a), model(items, lengths, user_b)
        unknown = model(items, lengths, user_a, torch.tensor([False]))
        before_item = model(items, lengths, user_a)
        model.item_knowledge[9] += 1.0
        after_item = model(items, lengths, user_a)
    assert not torch.allclose(a, b)  # the user's text moves every item's score
    assert not torch.allclose(a, unknown)  # a user without a text gets the learned unknown vector
    changed = (after_item - before_item).abs() > 1e-6
    assert changed[0, 9] and changed.sum() == 1  # item 9's text moves item 9 only (it is not in the input)
    with pytest.raises(InputError, match="knowledge vector"):
        model(items, lengths)


def test_sasrec_learns_a_sequential_pattern_beyond_chance():
    # Each user walks the catalog in steps of one from a random start: the next item is the last plus one.
    rng = np.random.default_rng(0)
    n_items = 30
    sequences = [np.arange(s, s + n) % n_items + 1 for s, n in zip(rng.integers(0, n_items, 300), rng.integers(5, 12, 300))]
    data = next_item_data(sequences, max_len=8)
    config = RecommendConfig(backbone="sasrec", knowledge=False, embed_dim=16, hidden_dim=16, n_heads=2, n_layers=2, dropout=0.0,
                             lr=1e-2, batch_size=64, max_epochs=15, patience=15, device="cpu")
    model = sasrec(n_items)
    result = train_sequential(model, data, None, config, progress=False)
    test = mean_metrics(evaluate_next_item(model, data.test, None, config))
    assert test["hr@5"] > 0.9  # chance: 5 of ~22 unseen candidates, about 0.23
    assert result.best_epoch >= 1 and len(result.curve) == 15


def test_user_knowledge_reaches_the_trained_model():
    # Every sequence starts 1, 2 and then goes to 4 (users of kind a) or 5 (kind b): only the user's text tells which.
    kind_b = np.arange(200) % 2 == 1
    sequences = [np.array([1, 2, 5 if b else 4, 6, 7]) for b in kind_b]
    vectors = np.where(kind_b[:, None], [[0.0, 1.0]], [[1.0, 0.0]]).astype(np.float32)
    knowledge = user_knowledge(200, np.arange(200), vectors)
    data = next_item_data(sequences, max_len=8)
    config = RecommendConfig(backbone="sasrec", embed_dim=16, hidden_dim=16, n_heads=2, n_layers=1, dropout=0.0, lr=1e-2,
                             batch_size=50, max_epochs=10, patience=10, unknown_rate=0.0, device="cpu")
    model = sasrec(7, knowledge_dim=2)
    train_sequential(model, data, knowledge, config, progress=False)
    after_two = next_item_targets([s[:3] for s in sequences], np.arange(200), cut=1, max_len=8)  # input 1, 2; target 4 or 5
    with_text = (rank_targets(model, after_two, knowledge) == 0).mean()
    swapped = user_knowledge(200, np.arange(200), vectors[:, ::-1].copy())
    with_wrong_text = (rank_targets(model, after_two, swapped) == 0).mean()
    assert with_text > 0.95 and with_wrong_text < 0.05


def test_length_buckets_cover_every_row_once_and_group_similar_lengths():
    lengths = torch.from_numpy(np.random.default_rng(0).integers(2, 51, 1000))
    batches = length_buckets(lengths, 32, torch.Generator().manual_seed(0), pool=8)
    rows = torch.cat(batches)
    assert sorted(rows.tolist()) == list(range(1000))
    spread = np.mean([int(lengths[b].max() - lengths[b].min()) for b in batches])
    assert spread < 10  # random batches of 32 would span ~45
