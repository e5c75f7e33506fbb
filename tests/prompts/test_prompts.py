import os
import re

import pandas as pd
import pytest

from dpo4rec.config import DataConfig, ModelConfig, PromptConfig
from dpo4rec.data.stage import run_data_stage
from dpo4rec.errors import InputError
from dpo4rec.prompts.stage import run_prompt_stage
from dpo4rec.prompts.templates import check_template, clean_text, domain_of

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _own_data(folder):
    folder.mkdir()
    rows = [(u, i, 5 if i % 2 else 2, t) for u in (1, 2) for t, i in enumerate(range(10 * u, 10 * u + 14))]
    pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"]).to_csv(folder / "interactions.csv", index=False)
    titles = {i: f'Item {{{i}}} "quoted"\nnew line {{0}}' for i in range(10, 34)}
    pd.DataFrame({"item_id": list(titles), "title": list(titles.values())}).to_csv(folder / "items.csv", index=False)
    return folder


def test_movie_prompts_hold_the_prompt_history_only(tmp_path):
    run_data_stage(tmp_path, DataConfig(dataset="ml-1m", n_users=20, seed=2))
    result = run_prompt_stage(tmp_path, PromptConfig(), ModelConfig())
    prompts = pd.read_parquet(result.folder / "prompts.parquet")
    inter = pd.read_parquet(tmp_path / "data" / "interactions.parquet")
    items = pd.read_parquet(tmp_path / "data" / "items.parquet").set_index("item_index")["title"]
    users = pd.read_parquet(tmp_path / "data" / "users.parquet").set_index("user_index")
    row = prompts.iloc[0]
    mine = inter[inter["user_index"] == row["user_index"]]
    shown = mine[mine["in_prompt"]]
    for item, rating in zip(shown["item_index"], shown["rating"]):
        assert f'"{items[item]}", {rating:g} stars' in row["message"]
    later = set(mine[~mine["in_prompt"]]["item_index"]) - set(shown["item_index"])
    assert not any(f'"{items[i]}"' in row["message"] for i in later)
    assert "genre" in row["message"] and users.loc[row["user_index"], "occupation"] in row["message"]
    assert row["text"].startswith("<|im_start|>") and row["text"].endswith("<|im_start|>assistant\n")
    assert result.summary["users"] == 20 and (prompts["n_dropped"] == 0).all()


def test_history_genres_name_each_movies_genres_and_need_a_genres_column(tmp_path):
    run_data_stage(tmp_path / "ml", DataConfig(dataset="ml-1m", n_users=20, seed=2))
    prompts = pd.read_parquet(run_prompt_stage(tmp_path / "ml", PromptConfig(history_genres=True), ModelConfig()).folder / "prompts.parquet")
    inter = pd.read_parquet(tmp_path / "ml" / "data" / "interactions.parquet")
    items = pd.read_parquet(tmp_path / "ml" / "data" / "items.parquet").set_index("item_index")
    row = prompts.iloc[0]
    shown = inter[(inter["user_index"] == row["user_index"]) & inter["in_prompt"]]
    for item, rating in zip(shown["item_index"], shown["rating"]):
        genres = ", ".join(items.loc[item, "genres"].split("|"))
        assert f'"{items.loc[item, "title"]}" ({genres}), {rating:g} stars\n' in row["message"] + "\n"
    run = tmp_path / "own"  # own data without a genres column: refused, naming the field and the file
    run_data_stage(run, DataConfig(dataset=str(_own_data(tmp_path / "mine"))))
    with pytest.raises(InputError, match=r"prompts.history_genres: .*items.parquet has no genres column"):
        run_prompt_stage(run, PromptConfig(history_genres=True), ModelConfig())
    assert not (run / "prompts").exists()


def test_braces_quotes_and_newlines_in_titles_and_truncation(tmp_path):
    data = _own_data(tmp_path / "mine")
    run = tmp_path / "run"
    run_data_stage(run, DataConfig(dataset=str(data)))
    result = run_prompt_stage(run, PromptConfig(max_prompt_tokens=130), ModelConfig())
    prompts = pd.read_parquet(result.folder / "prompts.parquet")
    assert re.search(r'"Item \{\d+\} "quoted" new line \{0\}", [25] stars', prompts["message"].iloc[0])
    assert (prompts["n_tokens"] <= 130).all()
    assert result.summary["users_truncated"] >= 1 and (prompts["n_dropped"] > 0).any()


def test_templates_are_checked_before_work():
    with pytest.raises(InputError, match=r"unknown field \{movie\}"):
        check_template("Likes: {history} {movie}", "user", "prompts.user_template")
    with pytest.raises(InputError, match="not a valid template"):
        check_template("Likes: {history", "user", "prompts.user_template")
    assert check_template("{profile}{history} {{literal}}", "user", "x")
    assert clean_text("a\tb\n\x00c") == "a b c"
    assert domain_of("ml-100k") == "movies" and domain_of("amazon-beauty") == "beauty" and domain_of("shop") == "generic"


def test_missing_data_stage_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="no data stage output"):
        run_prompt_stage(tmp_path, PromptConfig(), ModelConfig())
