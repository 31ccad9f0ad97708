"""Tests of the Amazon review reader (2014, 2018, 2023 formats) on small hand-checked dumps."""

import gzip
import os

import numpy as np
import pytest

import amazon_fixtures as fx
from seqrec_jax.data import amazon
from seqrec_jax.data.amazon import k_core_filter, read_amazon
from seqrec_jax.data.errors import DataFormatError

ITEMS = ["[PAD]", "B0001", "B0002", "B0003", "B0004"]
USERS = ["UA", "UB", "UC"]
SEQS = {"UA": [2, 1, 3], "UB": [2, 3, 1], "UC": [2, 4]}   # see the table in amazon_fixtures
LONG_DESC = ("word " * 400).rstrip()

# Hand-checked text of each item per release (row 0 is padding, B0004 has no metadata).
TEXT = {
    2014: {
        "title": ["", "L'Oreal Night Cream & Serum", "Shampoo", "Soap", ""],
        "brand": ["", "L'Oreal", "", "Dove", ""],
        "categories": ["", "Beauty > Skin Care > Face | Beauty > Gift Sets", "", "Beauty", ""],
        "price": ["", "12.50", "", "3.00", ""],
        "description": ["", "Rich night cream. For all skin types.", LONG_DESC, "Gentle.", ""],
    },
    2018: {
        "title": ["", "L'Oreal Night Cream & Serum", "Shampoo", "Soap", ""],
        "brand": ["", "L'Oreal", "", "Dove", ""],
        "categories": ["", "Beauty > Skin Care > Face", "All Beauty", "Beauty", ""],
        "price": ["", "$12.50", "", "$3.00", ""],
        "description": ["", "Rich night cream. For all skin types.", LONG_DESC, "Gentle.", ""],
    },
    2023: {
        "title": ["", "L'Oreal Night Cream & Serum", "Shampoo", "Soap", ""],
        "brand": ["", "L'Oreal", "", "Dove", ""],
        "categories": ["", "Beauty > Skin Care > Face", "All Beauty", "Beauty", ""],
        "price": ["", "12.50", "", "3.00", ""],
        "description": ["", "Rich night cream. For all skin types.", LONG_DESC, "Gentle.", ""],
    },
}


def _seqs(ds):
  return {ds.user_ids[u]: ds.sequence(u).tolist() for u in range(ds.n_users)}


def _write(path, text, gz=False):
  opener = gzip.open if gz else open
  with opener(path, "wt", encoding="utf-8") as f:
    f.write(text)
  return path


@pytest.mark.parametrize("year", [2014, 2018, 2023])
def test_formats_parse_to_expected_sequences_and_text(tmp_path, year):
  reviews, meta = fx.write_world(str(tmp_path), year)
  ds = read_amazon(reviews, meta, k_core=0)
  assert ds.item_ids.tolist() == ITEMS
  assert ds.user_ids.tolist() == USERS
  assert _seqs(ds) == SEQS
  assert ds.offsets.tolist() == [0, 3, 6, 8]
  assert ds.items.dtype == np.int32 and ds.offsets.dtype == np.int64
  assert {f: list(v) for f, v in ds.item_text.items()} == TEXT[year]
  s = ds.stats
  assert s["rows_read"] == 8 and s["interactions"] == 8
  assert s["rows_below_min_rating"] == 0
  assert s["kcore_rows_dropped"] == 0 and s["kcore_iterations"] == 0
  assert s["items_without_meta"] == 1           # B0004
  assert s["reviews_format"] == year and s["meta_format"] == year
  assert s["meta_duplicate_items"] == (1 if year == 2018 else 0)
  assert s["duplicate_rows"] == 0


def test_2023_keys_items_by_parent_asin_and_keeps_millisecond_order(tmp_path):
  # Same second, different milliseconds, written in reverse order: must sort by ms.
  rows = [("U1", "P1", 5_900, 5.0), ("U1", "P2", 5_100, 5.0), ("U1", "P3", 4_000, 5.0)]
  path = fx.write_reviews_2023(str(tmp_path / "Toys.jsonl"), rows)
  ds = read_amazon(path, k_core=0)
  assert ds.item_ids.tolist() == ["[PAD]", "P1", "P2", "P3"]  # parent_asin, not the variant
  assert ds.sequence(0).tolist() == [3, 2, 1]
  assert ds.item_text is None
  assert ds.name == "toys"


def test_kcore_needs_several_passes_exact_survivors(tmp_path):
  # k=2.  Pass 1 drops items C, F (1 row each); U5 is left with 1 row -> pass 2 drops it; D then
  # has 1 row -> pass 3; U3 is then left with only A -> pass 4.  Survivors: U1, U2 with A, B.
  rows = [("U1", "A", 1, 5.0), ("U1", "B", 2, 5.0),
          ("U2", "A", 1, 5.0), ("U2", "B", 2, 5.0),
          ("U3", "A", 1, 5.0), ("U3", "C", 2, 5.0), ("U3", "D", 3, 5.0),
          ("U5", "D", 1, 5.0), ("U5", "F", 2, 5.0)]
  path = fx.write_reviews_2018(str(tmp_path / "r.json"), rows)
  ds = read_amazon(path, k_core=2)
  assert ds.user_ids.tolist() == ["U1", "U2"]
  assert ds.item_ids.tolist() == ["[PAD]", "A", "B"]
  assert _seqs(ds) == {"U1": [1, 2], "U2": [1, 2]}
  s = ds.stats
  assert (s["kcore_rows_dropped"], s["kcore_users_dropped"], s["kcore_items_dropped"],
          s["kcore_iterations"]) == (5, 2, 3, 4)
  # k=1 and k=0 keep everything.
  for k in (0, 1):
    full = read_amazon(path, k_core=k)
    assert full.n_interactions == 9 and full.stats["kcore_iterations"] == 0


def test_kcore_on_world_drops_item_then_user(tmp_path):
  reviews, meta = fx.write_world(str(tmp_path), 2014)
  ds = read_amazon(reviews, meta, k_core=2)
  assert ds.user_ids.tolist() == ["UA", "UB"]
  assert ds.item_ids.tolist() == ["[PAD]", "B0001", "B0002", "B0003"]
  assert _seqs(ds) == {"UA": [2, 1, 3], "UB": [2, 3, 1]}
  assert ds.stats["kcore_iterations"] == 2
  assert ds.stats["kcore_rows_dropped"] == 2
  assert ds.stats["items_without_meta"] == 0
  assert ds.item_text["title"][1:] == ["L'Oreal Night Cream & Serum", "Shampoo", "Soap"]


def test_kcore_filter_function_matches_bruteforce():
  rng = np.random.default_rng(0)
  users = rng.integers(0, 30, size=400)
  items = rng.integers(0, 60, size=400)
  kept, _ = k_core_filter(users, items, 5)
  # Brute force: a naive fixed point.
  alive = np.ones(len(users), bool)
  changed = True
  while changed:
    changed = False
    for idx in np.flatnonzero(alive):
      if ((users[alive] == users[idx]).sum() < 5 or (items[alive] == items[idx]).sum() < 5):
        alive[idx] = False
        changed = True
  assert kept.tolist() == np.flatnonzero(alive).tolist()
  assert len(kept) > 0


def test_equal_timestamps_keep_file_order(tmp_path):
  rows = [("U1", "Z", 7, 5.0), ("U2", "A", 7, 5.0), ("U1", "A", 7, 5.0), ("U1", "M", 7, 5.0),
          ("U2", "Z", 7, 5.0), ("U1", "B", 3, 5.0), ("U1", "Z", 7, 5.0)]
  path = fx.write_reviews_2014(str(tmp_path / "r.json"), rows)
  ds = read_amazon(path, k_core=0)
  names = ds.item_ids
  got = {ds.user_ids[u]: [names[i] for i in ds.sequence(u)] for u in range(ds.n_users)}
  assert got == {"U1": ["B", "Z", "A", "M", "Z"], "U2": ["A", "Z"]}
  assert ds.stats["duplicate_rows"] == 1     # (U1, Z, 7) twice, kept


def test_python_literal_review_lines_and_plain_vs_gz(tmp_path):
  plain = fx.write_world(str(tmp_path), 2014, gz=False)
  (tmp_path / "gz").mkdir()
  gz = fx.write_world(str(tmp_path / "gz"), 2014, gz=True)
  (tmp_path / "lit").mkdir()
  lit = fx.write_reviews_2014(str(tmp_path / "lit" / "reviews_Beauty_5.json.gz"),
                              fx.WORLD_ROWS, literal=True)
  with open(lit, "rb") as f:
    assert f.read(2) == b"\x1f\x8b"
  a = read_amazon(*plain, k_core=0)
  b = read_amazon(*gz, k_core=0)
  c = read_amazon(lit, plain[1], k_core=0)
  for other in (b, c):
    assert other.items.tolist() == a.items.tolist()
    assert other.offsets.tolist() == a.offsets.tolist()
    assert other.item_ids.tolist() == a.item_ids.tolist()
    assert dict(other.item_text) == dict(a.item_text)
  assert a.name == b.name == "beauty"


def test_min_rating(tmp_path):
  reviews, _ = fx.write_world(str(tmp_path), 2023)
  ds = read_amazon(reviews, k_core=0, min_rating=4)
  assert ds.stats["rows_read"] == 8
  assert ds.stats["rows_below_min_rating"] == 3
  assert ds.item_ids.tolist() == ITEMS
  assert _seqs(ds) == {"UA": [1, 3], "UB": [2, 3], "UC": [4]}


def test_malformed_line_names_file_and_line(tmp_path):
  good = '{"reviewerID": "U1", "asin": "A", "overall": 5.0, "unixReviewTime": 1}\n'
  path = _write(tmp_path / "reviews_X_5.json", good + "\n" + good + "{not a record\n")
  with pytest.raises(DataFormatError, match=r"reviews_X_5\.json:4: expected one JSON object"):
    read_amazon(str(path), k_core=0)
  path = _write(tmp_path / "reviews_Y_5.json.gz",
                good + '{"reviewerID": "U1", "asin": "A", "overall": 5.0}\n', gz=True)
  with pytest.raises(DataFormatError, match=r"reviews_Y_5\.json\.gz:2: .*'unixReviewTime'"):
    read_amazon(str(path), k_core=0)
  path = _write(tmp_path / "r.json",
                good + '{"reviewerID": "U1", "asin": "A", "unixReviewTime": "soon"}\n')
  with pytest.raises(DataFormatError, match=r"r\.json:2: 'unixReviewTime' must be an integer"):
    read_amazon(str(path), k_core=0)
  # A meta line of a needed item without its id key.
  reviews = _write(tmp_path / "ok.json", good)
  meta = _write(tmp_path / "meta.json", "{'asin': 'A', 'title': 'x'}\n{'title': 'no id'}\n")
  with pytest.raises(DataFormatError, match=r"meta\.json:2: .*'asin'"):
    read_amazon(str(reviews), str(meta), k_core=0)
  assert issubclass(DataFormatError, ValueError)


def test_empty_files(tmp_path):
  empty = _write(tmp_path / "empty.json", "")
  with pytest.raises(DataFormatError, match=r"empty\.json: empty file"):
    read_amazon(str(empty), k_core=0)
  blank_gz = _write(tmp_path / "blank.json.gz", "\n\n", gz=True)
  with pytest.raises(DataFormatError, match=r"blank\.json\.gz: empty file"):
    read_amazon(str(blank_gz), k_core=0)
  reviews, _ = fx.write_world(str(tmp_path), 2018)
  with pytest.raises(DataFormatError, match=r"empty\.json: empty file"):
    read_amazon(reviews, str(empty), k_core=0)


def test_everything_filtered_is_an_error(tmp_path):
  reviews, _ = fx.write_world(str(tmp_path), 2018)
  with pytest.raises(ValueError, match="no interactions left"):
    read_amazon(reviews, k_core=10)


def test_text_helpers():
  f = amazon.item_text_fields
  assert f({"categories": [["A", "B"], ["C"]]})[2] == "A > B | C"
  assert f({"category": ["A", " B "]})[2] == "A > B"
  assert f({"category": [], "main_cat": '<img src="x.png">'})[2] == ""
  assert [f({"price": p})[3] for p in (12.99, 7, None, "", "$1.00 - $2.00", "None")] == [
      "12.99", "7.00", "", "", "$1.00 - $2.00", ""]
  assert f({"store": "S"})[1] == "S" and f({"brand": "B", "store": "S"})[1] == "B"
  assert len(f({"description": ["x" * 1500, "y" * 1500]})[4]) == 2000
