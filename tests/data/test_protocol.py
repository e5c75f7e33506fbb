import numpy as np
import pandas as pd
import pytest

from dpo4rec.config import DataConfig
from dpo4rec.data import load_dataset
from dpo4rec.data.protocol import build_protocol, prompt_history_length, split_users
from dpo4rec.errors import InputError


@pytest.fixture(scope="module")
def ml1m_protocol(ml1m):
    return build_protocol(ml1m, DataConfig(dataset="ml-1m", n_users=400, seed=3))


def test_prompt_history_length():
    assert list(prompt_history_length(np.array([2, 3, 20, 59, 60, 61, 1000]), 30)) == [1, 2, 10, 30, 30, 30, 30]
    assert int(prompt_history_length(40, 15)) == 15


def test_lists_follow_the_protocol(ml1m_protocol):
    p = ml1m_protocol
    inter = p.interactions
    by_user = {u: g for u, g in inter.groupby("user_index")}
    users = p.users.set_index("user_index")
    for row in p.lists.sample(300, random_state=0).itertuples():
        seq = by_user[row.user_index]
        n_prompt = users.loc[row.user_index, "n_prompt"]
        items, labels = np.asarray(row.items), np.asarray(row.labels)
        assert len(items) == 10 and len(set(items)) == 10
        start = n_prompt + 4 * row.chunk
        chunk = seq.iloc[start : start + 4]
        # the list holds exactly the chunk (interactions after the prompt history) ...
        in_chunk = np.isin(items, chunk["item_index"])
        assert in_chunk.sum() == 4 and (chunk["position"] >= n_prompt).all()
        # ... with rating > 3 as the label, and 6 items the user never touched
        expected = dict(zip(chunk["item_index"], (chunk["rating"] > 3).astype(int)))
        assert all(labels[i] == expected[items[i]] for i in np.flatnonzero(in_chunk))
        assert not np.isin(items[~in_chunk], seq["item_index"]).any()
        assert (labels[~in_chunk] == 0).all()
        # the recent history is the 10 interactions right before the chunk
        history = np.asarray(row.history)
        expect = seq["item_index"].to_numpy()[max(0, start - 10) : start]
        assert history[history > 0].tolist() == expect.tolist()


def test_lists_are_shuffled_not_positives_first(ml1m_protocol):
    first_four = np.stack(ml1m_protocol.lists["labels"].to_numpy())[:, :4]
    assert 0.1 < (first_four > 0).mean() < 0.5


def test_split_is_disjoint_seeded_and_80_10_10(ml1m_protocol, ml1m):
    users = ml1m_protocol.users
    counts = users["split"].value_counts()
    assert (counts["train"], counts["validation"], counts["test"]) == (320, 40, 40)
    assert users["user_id"].is_unique
    again = build_protocol(ml1m, DataConfig(dataset="ml-1m", n_users=400, seed=3))
    pd.testing.assert_frame_equal(users, again.users)
    pd.testing.assert_frame_equal(ml1m_protocol.lists, again.lists)
    other = build_protocol(ml1m, DataConfig(dataset="ml-1m", n_users=400, seed=4))
    assert set(other.users["user_id"]) != set(users["user_id"])
    lists_split = ml1m_protocol.lists["split"].to_numpy()
    assert (lists_split == users["split"].to_numpy()[ml1m_protocol.lists["user_index"]]).all()


def test_split_users_small_counts():
    codes = split_users(3, (0.8, 0.1, 0.1), seed=0)
    assert sorted(codes) == [0, 1, 2]
    assert (np.bincount(split_users(1000, (0.8, 0.1, 0.1), seed=1)) == [800, 100, 100]).all()


def test_a_users_lists_do_not_depend_on_the_subset(ml1m, ml1m_protocol):
    full = build_protocol(ml1m, DataConfig(dataset="ml-1m", seed=3))
    uid = ml1m_protocol.users["user_id"].iloc[0]
    def lists_of(p):
        idx = p.users.loc[p.users["user_id"] == uid, "user_index"].item()
        return np.stack(p.lists.loc[p.lists["user_index"] == idx, "items"].to_numpy())
    assert (lists_of(full) == lists_of(ml1m_protocol)).all()
    assert full.summary["users"]["selected"] == 6040


def test_short_users_are_dropped_and_counted(tmp_path):
    rows = [(1, i) for i in range(1, 13)] + [(2, 1)] + [(3, i) for i in range(1, 6)]
    folder = tmp_path / "d"
    folder.mkdir()
    pd.DataFrame(rows, columns=["user_id", "item_id"]).assign(rating=5.0).to_csv(folder / "interactions.csv", index=False)
    extra = pd.DataFrame({"user_id": 9, "item_id": range(100, 130), "rating": 4.0})
    pd.concat([pd.read_csv(folder / "interactions.csv"), extra]).to_csv(folder / "interactions.csv", index=False)
    p = build_protocol(load_dataset(folder), DataConfig(dataset=str(folder)))
    assert p.summary["users"]["dropped_fewer_than_2_interactions"] == 1  # user 2
    assert p.summary["users"]["dropped_no_complete_list"] == 1  # user 3: 3 prompt + 2 left
    assert sorted(p.users["user_id"]) == [1, 9]


def test_amazon_lists_are_all_positive_with_15_item_prompts(beauty_dir):
    data = load_dataset("amazon-beauty", beauty_dir)
    p = build_protocol(data, DataConfig(dataset="amazon-beauty", n_users=300))
    labels = np.stack(p.lists["labels"].to_numpy())
    assert (labels.sum(axis=1) == 4).all()
    assert p.users["n_prompt"].max() <= 15


def test_impossible_values():
    with pytest.raises(InputError, match="data.n_users must be >= 1"):
        DataConfig(n_users=0)
    with pytest.raises(InputError, match="data.split"):
        DataConfig(split=(0.5, 0.5, 0.5))
    with pytest.raises(InputError, match="data.list_size"):
        DataConfig(list_size=4)


def test_more_users_than_eligible(ml1m):
    with pytest.raises(InputError, match="only 6040 users"):
        build_protocol(ml1m, DataConfig(n_users=7000))
