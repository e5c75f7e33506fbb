import gzip
import json

import numpy as np
import pandas as pd
import pytest

from dpo4rec.data import load_dataset
from dpo4rec.errors import InputError


def test_ml1m_counts_and_order(ml1m):
    inter = ml1m.interactions
    assert inter["user_id"].nunique() == 6040
    assert inter["item_id"].nunique() == 3706
    assert len(inter) == 1_000_209
    assert len(ml1m.items) == 3883
    assert list(inter.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert inter["rating"].dtype == np.float64
    # sorted by user, then time
    assert inter["user_id"].is_monotonic_increasing
    assert (inter.groupby("user_id")["timestamp"].diff().dropna() >= 0).all()
    assert set(ml1m.users.columns) >= {"user_id", "gender", "age", "occupation"}
    assert ml1m.users.set_index("user_id").loc[1, "gender"] == "F"
    assert ml1m.positive_rating == 3.0 and ml1m.prompt_history_max == 30


def test_ml1m_ties_keep_source_order(ml1m):
    # user 1 rated "Titanic (1997)" and "Back to the Future (1985)" in the same
    # second; ratings.dat lists Back to the Future first (a tie kept as in the file).
    user1 = ml1m.interactions[ml1m.interactions["user_id"] == 1]
    same_second = user1[user1["timestamp"] == 978300055]["item_id"].tolist()
    assert same_second.index("Back to the Future (1985)") < same_second.index("Titanic (1997)")


def test_ml100k_counts():
    data = load_dataset("ml-100k")
    inter = data.interactions
    assert (inter["user_id"].nunique(), inter["item_id"].nunique(), len(inter)) == (943, 1682, 100_000)
    assert data.items.set_index("item_id").loc[1, "title"] == "Toy Story (1995)"


def test_amazon_beauty_counts(beauty_dir):
    data = load_dataset("amazon-beauty", path=beauty_dir)
    inter = data.interactions
    assert (inter["user_id"].nunique(), inter["item_id"].nunique(), len(inter)) == (22_363, 12_101, 198_502)
    assert inter["rating"].isna().all() and inter["timestamp"].isna().all()
    assert data.positive_rating is None and data.prompt_history_max == 15
    # order is the file's order: user 1 bought items 1..5 in that order
    assert inter[inter["user_id"] == 1]["item_id"].tolist() == [1, 2, 3, 4, 5]
    item1 = data.items.set_index("item_id").loc[1]
    assert item1["brand"] == "OPI" and item1["categories"].startswith("Makeup")
    # the folder is recognized by its files when given as the name
    assert len(load_dataset(str(beauty_dir)).interactions) == 198_502


def test_amazon_needs_a_path():
    with pytest.raises(InputError, match="needs --path"):
        load_dataset("amazon-beauty")


def test_mcauley_original_files(tmp_path):
    reviews = [
        {"reviewerID": "A1", "asin": "B2", "overall": 5.0, "unixReviewTime": 200},
        {"reviewerID": "A1", "asin": "B1", "overall": 4.0, "unixReviewTime": 100},
        {"reviewerID": "A2", "asin": "B1", "overall": 2.0, "unixReviewTime": 300},
    ]
    with gzip.open(tmp_path / "reviews_Beauty_5.json.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in reviews)
    meta = [
        "{'asin': 'B1', 'title': 'Rose \"Glow\" {serum}', 'brand': 'Acme', 'categories': [['Beauty', 'Skin Care']], 'price': 9.5}",
        "{'asin': 'B2', 'title': 'Lip balm', 'categories': [['Beauty', 'Makeup', 'Lips']]}",
    ]
    with gzip.open(tmp_path / "meta_Beauty.json.gz", "wt") as f:
        f.writelines(line + "\n" for line in meta)
    data = load_dataset(tmp_path)
    assert data.name == "amazon-beauty"
    assert data.interactions["item_id"].tolist() == ["B1", "B2", "B1"]  # A1 sorted by time
    items = data.items.set_index("item_id")
    assert items.loc["B1", "title"] == 'Rose "Glow" {serum}'
    assert items.loc["B2", "categories"] == "Beauty > Makeup > Lips"


def _write_custom(folder, inter_text, items_text=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "interactions.csv").write_text(inter_text)
    if items_text is not None:
        (folder / "items.csv").write_text(items_text)
    return folder


def test_custom_folder_csv_with_quotes_in_titles(tmp_path):
    folder = _write_custom(
        tmp_path / "mine",
        "user_id,item_id,rating,timestamp\n1,10,5,3\n1,11,2,1\n2,10,4,\n",
        'item_id,title,genre\n10,"The ""Best"" {movie}, part 2",drama\n11,Ünïcødé ☃,comedy\n',
    )
    data = load_dataset(folder)
    assert data.interactions["item_id"].tolist() == [11, 10, 10]
    assert np.isnan(data.interactions["timestamp"].iloc[2])
    assert data.items.set_index("item_id").loc[10, "title"] == 'The "Best" {movie}, part 2'
    assert data.positive_rating == 3.0


def test_custom_folder_parquet_without_ratings(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    pd.DataFrame({"user_id": [1, 1, 2], "item_id": [5, 6, 5]}).to_parquet(folder / "interactions.parquet")
    data = load_dataset(folder)
    assert data.positive_rating is None
    assert data.interactions["rating"].isna().all()
    assert data.items["title"].tolist() == ["5", "6"]


def test_custom_folder_with_string_ids_keeps_them_and_matches_the_item_table(tmp_path):
    folder = _write_custom(tmp_path / "strings", "user_id,item_id,rating\nA3NHUQ33CFH3VM,B0001,5\nu1,B0001,4\nu1,42,2\n")
    (folder / "items.csv").write_text("item_id,title\nB0001,Lip balm\n42,Shampoo\n")
    data = load_dataset(folder)
    assert sorted(data.interactions["user_id"]) == ["A3NHUQ33CFH3VM", "u1", "u1"]
    assert dict(zip(data.items["item_id"], data.items["title"])) == {"B0001": "Lip balm", "42": "Shampoo"}
    integers = load_dataset(_write_custom(tmp_path / "ints", "user_id,item_id\n1,2\n1,3\n"))
    assert integers.interactions["user_id"].dtype.kind == "i" and integers.items["item_id"].tolist() == [2, 3]


@pytest.mark.parametrize(
    "text, message",
    [
        ("user,item_id\n1,2\n", "missing column 'user_id'"),
        ("user_id,item_id\n1,2\n ,3\n", "line 3: user_id is empty"),
        ("user_id,item_id,rating\n1,2,5\n1,3,great\n", "line 3: rating 'great' is not a number"),
        ("user_id,item_id,rating\n1,2,5\n1,3,4\n1,2,5\n", "line 4: duplicated interaction .* same as line 2"),
        ("user_id,item_id\n1,2,3,4\n", "cannot read"),
    ],
)
def test_custom_folder_bad_input(tmp_path, text, message):
    folder = _write_custom(tmp_path / "bad", text)
    with pytest.raises(InputError, match=message) as info:
        load_dataset(folder)
    assert "interactions.csv" in str(info.value)


def test_unknown_names_and_folders(tmp_path):
    with pytest.raises(InputError, match="unknown dataset 'ml-2m'"):
        load_dataset("ml-2m")
    with pytest.raises(InputError, match="folder not found"):
        load_dataset(str(tmp_path / "missing") + "/")
    with pytest.raises(InputError, match="no data set files"):
        load_dataset(tmp_path)
