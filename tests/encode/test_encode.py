import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from dpo4rec.config import DataConfig, EncodeConfig
from dpo4rec.data.stage import read_protocol, run_data_stage
from dpo4rec.encode.cache import EmbeddingCache, cache_key
from dpo4rec.encode.encoder import TextEncoder
from dpo4rec.encode.stage import item_texts, read_embeddings, run_encode_stage
from dpo4rec.errors import InputError

COOKING = "The user loves cooking shows, baking bread, Italian pasta recipes and kitchen competitions. "
SPACE = "Later the user turned to astronauts, rockets, planets, galaxies and the exploration of deep space. "
LONG = COOKING * 8 + SPACE * 16  # well past MiniLM's 256 tokens; most of it is about space


def write_knowledge(run, round_index: int, texts_for) -> pd.DataFrame:
    users = read_protocol(run / "data").users["user_index"]
    rows = [(int(u), s, texts_for(int(u), s)) for u in users for s in range(3)]
    frame = pd.DataFrame(rows, columns=["user_index", "sample", "text"]).sample(frac=1, random_state=0)  # any row order
    folder = run / f"round_{round_index}" / "generate"
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(folder / "knowledge.parquet", index=False)
    return frame


def base_text(user: int, sample: int) -> str:
    if user == 0 and sample == 1:
        return LONG
    if sample == 2:
        return "A fan of classic dramas."  # the same text for every user: encoded once
    return f"User {user} (sample {sample}) likes comedies and thrillers."


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("encode-run")
    run_data_stage(folder, DataConfig(dataset="ml-100k", n_users=30))
    write_knowledge(folder, 0, base_text)
    return folder


def test_stage_writes_keyed_vectors_and_reports_long_texts(run):
    result = run_encode_stage(run, 0, EncodeConfig(), progress=False)
    emb = read_embeddings(result.folder)
    assert len(emb.user_index) == 90 and emb.user_vectors.shape == (90, 384) and emb.dim == 384
    keys = list(zip(emb.user_index, emb.sample))
    assert keys == sorted(keys)
    assert emb.encoder == "sentence-transformers/all-MiniLM-L6-v2"
    np.testing.assert_allclose(np.linalg.norm(emb.user_vectors, axis=1), 1.0, atol=1e-4)
    same = emb.user_vectors[emb.sample == 2]
    np.testing.assert_array_equal(same, np.repeat(same[:1], len(same), axis=0))
    items = pd.read_parquet(run / "data" / "items.parquet")
    assert emb.item_vectors.shape == (len(items), 384) and (emb.item_index == items["item_index"]).all()

    manifest = json.loads((result.folder / "manifest.json").read_text())
    assert manifest["encoder"] == {"encoder": emb.encoder, "dim": 384, "max_seq_length": 256}
    assert manifest["long_texts"] == {"policy": "chunk", "user_texts": 1, "item_texts": 0}
    assert not any(p.suffix in (".pkl", ".pickle") for p in result.folder.iterdir())


def test_long_texts_are_chunked_not_truncated(run):
    chunked = read_embeddings(run / "round_0" / "encode")
    long_vector = chunked.user_vectors[(chunked.user_index == 0) & (chunked.sample == 1)][0]
    encoder = TextEncoder(long_texts="truncate")
    truncated, report = encoder.encode([LONG], progress=False)
    assert report.count == 1 and report.longest_tokens > 256
    space = encoder.encode([SPACE * 3], progress=False)[0][0]
    # truncation keeps mostly the cooking part; the chunked vector sees the whole text
    assert float(long_vector @ space) > float(truncated[0] @ space) + 0.05
    with pytest.raises(InputError, match="exceed the encoder's max_seq_length 256"):
        TextEncoder(long_texts="error").encode(["short", LONG], progress=False)


def test_reuse_and_cache_across_rounds(run):
    assert run_encode_stage(run, 0, EncodeConfig(), progress=False).reused
    key = cache_key("sentence-transformers/all-MiniLM-L6-v2", "chunk")
    before = len(EmbeddingCache(run / "cache" / "encode" / key, 384, "x"))
    # round 1: only sample 0 changes, for every user
    write_knowledge(run, 1, lambda u, s: f"Round one: user {u} prefers westerns." if s == 0 else base_text(u, s))
    result = run_encode_stage(run, 1, EncodeConfig(), progress=False)
    assert not result.reused
    assert len(EmbeddingCache(run / "cache" / "encode" / key, 384, "x")) == before + 30
    r0, r1 = read_embeddings(run / "round_0" / "encode"), read_embeddings(run / "round_1" / "encode")
    np.testing.assert_array_equal(r0.user_vectors[r0.sample > 0], r1.user_vectors[r1.sample > 0])
    np.testing.assert_array_equal(r0.item_vectors, r1.item_vectors)


def test_bad_knowledge_files_are_input_errors(run, tmp_path):
    with pytest.raises(InputError, match="knowledge.parquet not found"):
        run_encode_stage(run, 7, EncodeConfig(), progress=False)
    folder = run / "round_8" / "generate"
    folder.mkdir(parents=True)
    pd.DataFrame({"user_index": [0, 0], "sample": [0, 0], "text": ["a", "b"]}).to_parquet(folder / "knowledge.parquet")
    with pytest.raises(InputError, match=r"\(user_index, sample\) = \(0, 0\) appears twice"):
        run_encode_stage(run, 8, EncodeConfig(), progress=False)
    pd.DataFrame({"user_index": [0], "answer": ["a"]}).to_parquet(folder / "knowledge.parquet")
    with pytest.raises(InputError, match="needs columns user_index, sample, text"):
        run_encode_stage(run, 8, EncodeConfig(), progress=False)
    assert not (run / "round_8" / "encode").exists()
    result = subprocess.run([sys.executable, "-m", "dpo4rec", "encode", "--out", str(run), "--round", "9"], capture_output=True, text=True)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_item_texts_use_title_and_attributes():
    items = pd.DataFrame({
        "item_index": [1, 2], "item_id": [10, 20], "title": ["Heat (1995)", "Fargo (1996)"],
        "year": [1995, 1996], "genres": ["Action|Crime", "Crime"],
    })
    assert item_texts(items) == ["Heat (1995). year: 1995. genres: Action, Crime", "Fargo (1996). year: 1996. genres: Crime"]
    extra = pd.DataFrame({"item_index": [2], "text": ["A dark comedy."]})
    assert item_texts(items, extra)[1].endswith("genres: Crime. A dark comedy.")


def test_item_knowledge_reaches_the_item_tower_and_changes_scores(run, tmp_path):
    """Round 0's item_knowledge.parquet (KAR's item texts) is encoded with each title for every round; the
    recommender's item tower reads it (items_plain.safetensors keeps the titles-only vectors for the arm without)."""
    import shutil

    from dpo4rec.config import RecommendConfig
    from dpo4rec.recommend.features import list_tensors, user_knowledge
    from dpo4rec.recommend.train import build_recommender, predict

    copy = tmp_path / "run"
    shutil.copytree(run / "data", copy / "data")
    write_knowledge(copy, 0, base_text)
    write_knowledge(copy, 1, base_text)
    items = pd.read_parquet(copy / "data" / "items.parquet")
    known = items["item_index"].to_numpy()[:40]
    pd.DataFrame({"item_index": known, "text": [f"A film about topic {i % 7}, loved by critics." for i in range(40)]}).to_parquet(
        copy / "round_0" / "generate" / "item_knowledge.parquet", index=False)
    run_encode_stage(copy, 0, EncodeConfig(), progress=False)
    run_encode_stage(copy, 1, EncodeConfig(), progress=False)  # later rounds read round 0's item texts too
    for round_index in (0, 1):
        folder = copy / f"round_{round_index}" / "encode"
        assert json.loads((folder / "summary.json").read_text())["item_knowledge_texts"] > 0
        with_texts, plain = read_embeddings(folder), read_embeddings(folder, item_knowledge=False)
        changed = ~np.isclose(with_texts.item_vectors, plain.item_vectors).all(axis=1)
        used = np.abs(plain.item_vectors).sum(axis=1) > 0
        assert changed[np.isin(with_texts.item_index, known) & used].all() and not changed[~np.isin(with_texts.item_index, known)].any()
    data = read_protocol(copy / "data")
    lists = list_tensors(data.lists)
    emb = with_texts
    users, vectors = emb.for_sample(0)
    knowledge = user_knowledge(len(data.users), users, vectors)
    scores = {}
    for name, vectors_of_items in (("with", with_texts), ("plain", plain)):
        model = build_recommender(RecommendConfig(), data.items, lists, emb.dim, (vectors_of_items.item_index, vectors_of_items.item_vectors))
        assert model.item_knowledge.abs().sum(dim=1).gt(0).sum() > 0.5 * len(np.unique(lists.items))  # the tower's input: non-zero
        scores[name] = predict(model, lists, knowledge)
    assert not np.allclose(scores["with"], scores["plain"])  # same weights, other item texts: other scores
