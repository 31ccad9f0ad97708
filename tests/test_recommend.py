"""Serving a trained workdir (seqrec_jax.recommend): batch top-K against a numpy brute force, ties,
id round trips, exclude_seen, the Python API, the ScaNN export's recall, crash safety and errors.

One tiny SASRec is trained once (module fixture) on a generated ring-walk dataset with > 2k items
whose original ids differ from the dense ids, so a mix-up of the two cannot pass.
"""

import copy
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from seqrec_jax import loop
from seqrec_jax import recommend
from seqrec_jax.default_config import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 20


def _write_ring_walks(path, n_users=700, ring=2600, seed=0):
  """Users walk a ring of items with small steps; ids are renumbered by the reader."""
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for u in range(n_users):
      item = int(rng.integers(0, ring))
      for _ in range(int(rng.integers(4, 14))):
        f.write(f"{1000 + 3 * u} {7 * item + 5}\n")  # original ids: users 1000.., items 7i+5
        item = (item + int(rng.integers(0, 3))) % ring
  return path


def _config(path):
  c = base_config()
  c.data.format = "pairs"
  c.data.path = path
  c.data.max_len = 10
  c.model.hidden, c.model.n_heads, c.model.inner, c.model.n_layers = 32, 2, 64, 1
  c.model.dropout = c.model.attn_dropout = 0.1
  c.model.vocab_pad_multiple = 8
  c.train.batch_size, c.train.num_steps = 64, 40
  c.train.eval_every_steps, c.train.log_every_steps = 20, 10
  c.train.patience = 0
  c.train.progress = False
  c.eval.batch_size = 128
  c.checkpoint.async_save = False
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("rec")
  data = _write_ring_walks(str(root / "walks.txt"))
  workdir = str(root / "wd")
  loop.train_and_evaluate(_config(data), workdir)
  return workdir, data


@pytest.fixture(scope="module")
def rec(trained):
  return recommend.Recommender.from_workdir(trained[0])


@pytest.fixture(scope="module")
def brute_force(rec):
  """Every user's [n_items + 1] scores from an unsharded forward pass, windows sliced here."""
  params = jax.device_get(rec.params)
  ds, length = rec.dataset, rec.max_len
  windows = np.zeros((ds.n_users, length), np.int32)
  for u in range(ds.n_users):
    seq = ds.sequence(u)[-length:]  # the whole sequence: valid and test items included
    windows[u, length - len(seq):] = seq
  fn = jax.jit(lambda p, x: rec.model.apply({"params": p}, x,
                                            method=lambda m, y: m.score(m(y, train=False))))
  scores = np.concatenate([np.asarray(fn(params, windows[i:i + 256]))
                           for i in range(0, ds.n_users, 256)])
  return scores[:, :ds.n_items + 1]  # [n_users, n_items + 1], column 0 = padding (-inf)


@pytest.fixture(scope="module")
def all_rows(rec, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("recs") / "recs.jsonl")
  stats = rec.write_topk(out, K, progress=False, decimals=None)
  with open(out) as f:
    rows = [json.loads(line) for line in f]
  assert stats["rows"] == len(rows) == rec.dataset.n_users
  return rows


def _dense(rec, items):
  return np.asarray(rec.item_index(items))


def _assert_same_ranking(got_ids, want_ids, scores_row, tol=1e-5):
  """Equal lists, except that items whose scores differ by < tol (float near-ties) may swap."""
  got_ids, want_ids = np.asarray(got_ids), np.asarray(want_ids)
  assert len(got_ids) == len(want_ids)
  for a, b in zip(got_ids, want_ids):
    if a != b:
      assert abs(scores_row[a] - scores_row[b]) < tol, (a, b, scores_row[a], scores_row[b])


def test_batch_topk_equals_numpy_argsort(rec, brute_force, all_rows):
  assert rec.n_items >= 2000
  exact_rows = 0
  for u, row in enumerate(all_rows):
    s = brute_force[u]
    # Stable argsort of -scores: ties in ascending dense id, as jax.lax.top_k documents.
    want = np.argsort(-s, kind="stable")[:K]
    got = _dense(rec, row["items"])
    assert 0 not in got
    np.testing.assert_allclose(row["scores"], s[want], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(row["scores"], s[got], rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(row["scores"]) <= 0)
    _assert_same_ranking(got, want, s)
    exact_rows += np.array_equal(got, want)
  assert exact_rows >= 0.98 * len(all_rows)  # swaps only at float near-ties


def test_exact_ties_come_in_ascending_id_order(rec, brute_force):
  """Items with bit-identical embeddings tie exactly: the lower dense id is listed first."""
  user = 5
  top = int(np.argmax(brute_force[user]))
  tied = [top]
  for other in (1, 2, rec.n_items - 1, rec.n_items):  # ids below and above the original one
    if other not in tied:
      tied.append(other)
  table = rec.params["item_embedding"]["embedding"]
  host = np.asarray(jax.device_get(table)).copy()
  host[tied] = host[top]
  twin = copy.copy(rec)
  twin.params = jax.tree.map(lambda x: x, rec.params)
  twin.params["item_embedding"] = {"embedding": jax.device_put(host, table.sharding)}
  history = [str(x) for x in rec.item_ids[rec.dataset.sequence(user)]]
  got = twin.recommend(history, k=len(tied), exclude_seen=False)
  assert len(set(got.scores)) == 1, got.scores  # an exact tie
  assert got.items == [str(rec.item_ids[i]) for i in sorted(tied)]


def test_original_ids_round_trip(trained, rec, all_rows):
  users_in_file, items_in_file = set(), set()
  with open(trained[1]) as f:
    for line in f:
      u, i = line.split()
      users_in_file.add(u)
      items_in_file.add(i)
  assert [r["user"] for r in all_rows] == [str(u) for u in rec.user_ids]
  assert set(r["user"] for r in all_rows) == users_in_file
  returned = {i for r in all_rows for i in r["items"]}
  assert returned <= items_in_file
  # Original ids are not the dense ids (renumbered), and map back and forth.
  assert not set(map(str, range(1, rec.n_items + 1))) <= items_in_file
  dense = rec.item_index(sorted(items_in_file))
  assert sorted(map(str, rec.item_ids[dense])) == sorted(items_in_file)


def test_exclude_seen_removes_exactly_the_history(rec, tmp_path):
  users = [str(u) for u in rec.user_ids[:24]]
  full = rec.recommend_users(users, k=rec.n_items, exclude_seen=False)
  out = str(tmp_path / "seen.jsonl")
  rec.write_topk(out, K, users=users, exclude_seen=True, progress=False, decimals=None)
  with open(out) as f:
    rows = [json.loads(line) for line in f]
  changed = 0
  for u, ranking, row in zip(users, full, rows):
    assert row["user"] == u
    history = {str(x) for x in rec.item_ids[rec.dataset.sequence(rec.user_index([u])[0])]}
    want = [i for i in ranking.items if i not in history][:K]
    assert row["items"] == want
    assert not history & set(row["items"])
    changed += ranking.items[:K] != want
  assert changed > len(users) // 2  # histories do sit at the top of the plain ranking
  # The whole catalogue: exactly the history is missing (also items older than the max_len window).
  long_users = [u for u in rec.user_ids if len(rec.dataset.sequence(rec.user_index([u])[0])) >
                rec.max_len + 2][:8]
  assert long_users
  everything = {str(x) for x in rec.item_ids[1:]}
  for u, ranking, excluded in zip(long_users,
                                  rec.recommend_users(long_users, k=rec.n_items,
                                                      exclude_seen=False),
                                  rec.recommend_users(long_users, k=rec.n_items)):
    history = {str(x) for x in rec.item_ids[rec.dataset.sequence(rec.user_index([u])[0])]}
    assert set(excluded.items) == everything - history
    assert excluded.items == [i for i in ranking.items if i not in history]


def test_api_matches_the_batch_file_row(rec, all_rows, brute_force):
  for u in (0, 7, 123, len(all_rows) - 1):
    history = [str(x) for x in rec.item_ids[rec.dataset.sequence(u)]]
    got = rec.recommend(history, k=K, exclude_seen=False)
    row = all_rows[u]
    _assert_same_ranking(_dense(rec, got.items), _dense(rec, row["items"]), brute_force[u])
    np.testing.assert_allclose(got.scores, row["scores"], rtol=1e-6, atol=1e-6)
  # A batch of histories answers each as alone.
  histories = [[str(x) for x in rec.item_ids[rec.dataset.sequence(u)]] for u in (3, 4)]
  batch = rec.recommend(histories, k=5)
  assert [b.items for b in batch] == [rec.recommend(h, k=5).items for h in histories]


def test_new_user_unknown_and_empty_histories(rec, caplog):
  new = [str(rec.item_ids[i]) for i in (11, 500, 501, 502)]  # no user has this history
  got = rec.recommend(new, k=10)
  assert len(got.items) == 10 and not set(got.items) & set(new)
  with pytest.raises(recommend.UnknownIdError, match=r"NOPE-1.*NOPE-2"):
    rec.recommend(new + ["NOPE-2", "NOPE-1"], k=10)
  with pytest.raises(recommend.UnknownIdError, match="history 1.*NOPE"):
    rec.recommend([new, ["NOPE"]], k=10)
  caplog.set_level(logging.INFO)
  dropped = rec.recommend(["NOPE-1"] + new, k=10, on_unknown="drop")
  assert dropped.items == got.items
  assert "dropped 1 unknown item id(s) of 5" in caplog.text
  with pytest.raises(ValueError, match="empty after dropping 2 unknown"):
    rec.recommend(["NOPE-1", "NOPE-2"], k=10, on_unknown="drop")
  with pytest.raises(ValueError, match="empty"):
    rec.recommend([], k=10)
  with pytest.raises(recommend.UnknownIdError, match="nobody"):
    rec.recommend_users(["nobody"])


def test_export_vectors_and_scann_recall(rec, brute_force, tmp_path):
  out = str(tmp_path / "export")
  manifest = rec.export(out, k=100, tree_min_items=0)  # force the tree + AH + reorder path
  assert manifest["index"]["type"] == "tree_ah"
  assert manifest["recall"]["recall@100"] >= 0.95
  items = np.load(os.path.join(out, "item_embeddings.npy"))
  users = np.load(os.path.join(out, "user_vectors.npy"))
  with open(os.path.join(out, "item_ids.json")) as f:
    item_ids = json.load(f)
  with open(os.path.join(out, "user_ids.json")) as f:
    user_ids = json.load(f)
  assert items.shape == (rec.n_items, rec.dim) and users.shape == (rec.dataset.n_users, rec.dim)
  assert item_ids == [str(x) for x in rec.item_ids[1:]] and user_ids == list(rec.user_ids)
  # The exported vectors reproduce the model's scores: user . item == score(user)[item].
  np.testing.assert_allclose(users @ items.T, brute_force[:, 1:], rtol=1e-4, atol=1e-4)
  # The serialized index loads from the (renamed) folder and answers with row numbers.
  searcher, ids, on_disk = recommend.load_export(out)
  assert on_disk == manifest and ids == item_ids
  recall, _ = recommend.scann_recall(searcher, items, users[:50], 100)
  assert recall >= 0.95
  # Rerun: complete and unchanged settings -> skipped, nothing rebuilt.
  before = os.path.getmtime(os.path.join(out, "export.json"))
  again = rec.export(out, k=100, tree_min_items=0)
  assert again == manifest and os.path.getmtime(os.path.join(out, "export.json")) == before
  assert not os.path.exists(out + ".tmp")


_BUILD_IN_A_NEW_PROCESS = """
import json, os, sys
import numpy as np
from seqrec_jax import recommend
d = sys.argv[1]
params = json.load(open(os.path.join(d, "params.json")))
searcher = recommend.build_scann(np.load(os.path.join(d, "table.npy")), 100, params)
answers = searcher.search_batched(np.load(os.path.join(d, "queries.npy")))[0]
np.save(os.path.join(d, "answers.npy"), answers)
"""


def test_scann_tree_recall_on_clustered_table(tmp_path):
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(64, 32)).astype(np.float32)

  def draw(n):
    return (centers[rng.integers(0, 64, n)] + 0.3 * rng.normal(size=(n, 32))).astype(np.float32)

  items, queries = draw(20_000), draw(300)
  params = recommend._index_params(len(items), 100, 10_000, 0, 0, 0)
  assert params["type"] == "tree_ah" and params["num_leaves_to_search"] < params["num_leaves"]
  recall, _ = recommend.scann_recall(recommend.build_scann(items, 100, params), items, queries, 100)
  assert recall >= 0.95
  # The check can fail: one leaf of ~141 finds far fewer of the exact neighbours.
  poor = dict(params, num_leaves_to_search=1, reorder=100)
  low, _ = recommend.scann_recall(recommend.build_scann(items, 100, poor), items, queries, 100)
  assert low < 0.9
  # k-means++ tree centres: a build in a fresh interpreter (another session or machine) answers
  # as this one does; with ScaNN's random init the two differ (seen: 290 of 300 queries).
  assert params["tree_init"] == "kmeans++"
  np.save(tmp_path / "table.npy", items)
  np.save(tmp_path / "queries.npy", queries)
  with open(tmp_path / "params.json", "w") as f:
    json.dump(poor, f)
  subprocess.run([sys.executable, "-c", _BUILD_IN_A_NEW_PROCESS, str(tmp_path)], check=True,
                 capture_output=True)
  np.testing.assert_array_equal(
      np.load(tmp_path / "answers.npy"),
      recommend.build_scann(items, 100, poor).search_batched(queries)[0])


def test_killed_run_leaves_no_finished_looking_file(rec, tmp_path, monkeypatch):
  small = copy.copy(rec)
  small.batch_size = 8  # several batches for 40 users
  users = [str(u) for u in rec.user_ids[:40]]
  out = str(tmp_path / "recs.jsonl")
  calls = {"n": 0}
  real_write = recommend.RowsWriter.write_block

  def dies_on_third_batch(self, *args):
    calls["n"] += 1
    if calls["n"] == 3:
      raise KeyboardInterrupt("killed")
    return real_write(self, *args)

  monkeypatch.setattr(recommend.RowsWriter, "write_block", dies_on_third_batch)
  with pytest.raises(KeyboardInterrupt):
    small.write_topk(out, 5, users=users, progress=False)
  monkeypatch.undo()
  assert not os.path.exists(out) and os.path.getsize(out + ".tmp") > 0  # only the partial .tmp
  with open(out + ".tmp", "a") as f:
    f.write('{"user": "truncat')
  first = small.write_topk(out, 5, users=users, progress=False)
  assert not first["skipped"] and first["rows"] == 40 and not os.path.exists(out + ".tmp")
  with open(out) as f:
    rows = [json.loads(line) for line in f]
  assert [r["user"] for r in rows] == users and all(len(r["items"]) == 5 for r in rows)
  mtime = os.path.getmtime(out)
  again = small.write_topk(out, 5, users=users, progress=False)
  assert again["skipped"] and again["rows"] == 40 and os.path.getmtime(out) == mtime
  with pytest.raises(FileExistsError, match="other settings"):
    small.write_topk(out, 6, users=users, progress=False)
  redone = small.write_topk(out, 6, users=users, progress=False, overwrite=True)
  assert not redone["skipped"]
  with open(out) as f:
    assert all(len(json.loads(line)["items"]) == 6 for line in f)


def test_workdir_errors_name_the_path(trained, tmp_path):
  workdir = trained[0]
  with pytest.raises(FileNotFoundError, match="config.json"):
    recommend.Recommender.from_workdir(str(tmp_path / "nothing"))
  no_best = tmp_path / "no_best"
  no_best.mkdir()
  shutil.copy(os.path.join(workdir, "config.json"), no_best / "config.json")
  with pytest.raises(FileNotFoundError, match=str(no_best / "best")):
    recommend.Recommender.from_workdir(str(no_best))
  old = tmp_path / "old"
  shutil.copytree(workdir, old)
  with open(old / "config.json") as f:
    config = json.load(f)
  del config["eval"]["exclude_seen"]
  with open(old / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=str(old / "config.json") + ".*eval.exclude_seen"):
    recommend.Recommender.from_workdir(str(old))


def test_changed_data_is_a_clear_error(trained, tmp_path):
  moved = tmp_path / "moved"
  shutil.copytree(trained[0], moved)
  with open(moved / "config.json") as f:
    config = json.load(f)
  config["data"]["path"] = _write_ring_walks(str(tmp_path / "other.txt"), n_users=50)
  with open(moved / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=str(moved / "best") + ".*does not hold parameters"):
    recommend.Recommender.from_workdir(str(moved))


@pytest.mark.parametrize("name", ["gru4rec", "bert4rec"])
def test_other_encoders_score_by_dot_product(rec, name):
  """GRU4Rec and BERT4Rec (random init): the export's dot-product check holds, top-K is exact."""
  import importlib  # pylint: disable=g-import-not-at-top
  mod = importlib.import_module(f"configs.{name}.ml100k")
  config = mod.get_config()
  config.model = getattr(mod, f"{name}_model")()
  config.model.hidden, config.model.vocab_pad_multiple = 16, 8
  if name == "gru4rec":
    config.model.gru_hidden = 16
  else:
    config.model.n_layers, config.model.inner = 1, 32
  config.data.max_len = rec.max_len
  config.eval.batch_size = 8
  config.mesh.num_devices = 2  # sharded, but quick to compile
  # Random parameters drawn in numpy: jitting the model's own initialisers costs seconds here.
  from seqrec_jax import models  # pylint: disable=g-import-not-at-top
  model, _ = models.build_model(config.model, n_items=rec.n_items, max_len=rec.max_len)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             np.ones((1, rec.max_len), np.int32))["params"])
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda x: (0.3 * rng.normal(size=x.shape)).astype(np.float32),
                        jax.tree.map(lambda b: b.value if hasattr(b, "value") else b, shapes,
                                     is_leaf=lambda b: hasattr(b, "value")))
  other = recommend.Recommender.from_config(config, rec.dataset, params=params)
  assert other.check_dot_product(sample=8) < 1e-4
  table = other.item_embeddings()
  histories = [rec.dataset.sequence(u) for u in range(8)]
  vectors = other.vectors_dense(histories)
  ids, _ = other.topk_dense(histories, 10, exclude_seen=False)
  for v, got in zip(vectors, ids):
    s = table @ v
    _assert_same_ranking(got, np.argsort(-s, kind="stable")[:10] + 1,
                         np.concatenate([[-np.inf], s]))
  if name == "bert4rec":  # the [MASK] row is a table row but never an item
    assert other.item_table().shape[0] > rec.n_items + 1
    assert rec.n_items + 1 not in ids


def test_a_score_that_is_not_a_dot_product_is_refused(rec, tmp_path):
  from seqrec_jax.models.sasrec import SASRec  # pylint: disable=g-import-not-at-top

  class Biased(SASRec):
    def score(self, user_vectors):
      return super().score(user_vectors) + 0.01 * jax.numpy.arange(self.config.table_rows)

  twin = copy.copy(rec)
  twin.model = Biased(rec.model.config)
  twin._steps = {}  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="not a dot product"):
    twin.export(str(tmp_path / "export"))
  assert not os.path.exists(tmp_path / "export")
  # An existing folder that is not an export is never replaced.
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep")
  with pytest.raises(FileExistsError, match="not an export folder"):
    rec.export(str(tmp_path / "mine"))
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_shard_names():
  assert recommend.shard_path("/w/recs.jsonl", 0, 1) == "/w/recs.jsonl"
  assert recommend.shard_path("/w/recs.jsonl", 1, 2) == "/w/recs-00001-of-00002.jsonl"


def test_recommend_launcher_with_a_users_file(trained, tmp_path):
  workdir = trained[0]
  users = tmp_path / "users.txt"
  users.write_text("1003\n\n1000\n")
  out = tmp_path / "sub.jsonl"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "recommend.py"), f"--workdir={workdir}",
       f"--users={users}", "--exclude_seen", "--top_k=7", f"--out={out}", "--noprogress"],
      capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["user"] for r in rows] == ["1003", "1000"]
  assert all(len(r["items"]) == len(r["scores"]) == 7 for r in rows)


def test_two_processes_write_one_shard_each(trained, all_rows, tmp_path):
  """2 processes x 2 devices: each writes its own shard; together they are the 1-process file."""
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  out = tmp_path / "recs.jsonl"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "launch", "recommend.py"), f"--workdir={trained[0]}",
       f"--top_k={K}", f"--out={out}", "--decimals=-1", "--noprogress", "--batch_size=64",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert not out.exists()
  rows = []
  for i in range(2):
    shard = tmp_path / f"recs-0000{i}-of-00002.jsonl"
    with open(shard) as f:
      part = [json.loads(line) for line in f]
    assert 0 < len(part) < len(all_rows)
    rows += part
  by_user = {r["user"]: r for r in all_rows}
  assert sorted(r["user"] for r in rows) == sorted(by_user)
  for r in rows:
    np.testing.assert_allclose(r["scores"], by_user[r["user"]]["scores"], rtol=1e-5, atol=1e-6)


def test_parquet_file_holds_the_jsonl_rows(rec, tmp_path):
  """A .parquet name writes the same rows as JSONL (ids, order, rounded scores, short rows)."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  small = copy.copy(rec)
  small.batch_size = 8  # several row groups
  users = [str(u) for u in rec.user_ids[:30]]
  k = rec.n_items  # every item: with exclude_seen the rows run short (-inf entries dropped)
  jsonl = small.write_topk(str(tmp_path / "recs.jsonl"), k, users=users, exclude_seen=True,
                           progress=False)
  parquet = small.write_topk(str(tmp_path / "recs.parquet"), k, users=users, exclude_seen=True,
                             progress=False)
  assert jsonl["rows"] == parquet["rows"] == 30
  assert not os.path.exists(tmp_path / "recs.parquet.tmp")
  with open(tmp_path / "recs.jsonl") as f:
    want = [json.loads(line) for line in f]
  table = pq.read_table(tmp_path / "recs.parquet")
  assert table.column_names == ["user", "items", "scores"]
  assert pq.ParquetFile(tmp_path / "recs.parquet").num_row_groups == 4  # 30 rows, 8 a block
  got = table.to_pylist()
  assert got == want
  assert any(len(r["items"]) < k for r in got)  # the history was left out
  again = small.write_topk(str(tmp_path / "recs.parquet"), k, users=users, exclude_seen=True,
                           progress=False)
  assert again["skipped"]
