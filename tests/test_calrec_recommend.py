"""Serving a CALRec workdir (calrec_jax.recommend): the batch file against the Python API, id round
trips, exclude_seen, unknown ids, the embedding ranking against numpy, seeds, the merge scores,
rerun safety and the launcher's dispatch.

One tiny CALRec is trained once (module fixture) on the embedded ml-100k, whose original item ids
("242", "302", ...) differ from the dense ids, so a mix-up of the two cannot pass.  Its sampled
texts are poor (30 steps), but every step of the pipeline (sample, decode, BM25, merge) runs.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from calrec_jax import ranking
from calrec_jax import recommend as calrec_recommend
from seqrec_jax import loop
from seqrec_jax import recommend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 3
N_USERS = 12


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  from configs.calrec import ml100k  # pylint: disable=g-import-not-at-top
  c = ml100k.get_config("tiny")
  c.train.progress = False
  c.calrec.test_users = 16
  wd = str(tmp_path_factory.mktemp("calrec_rec") / "wd")
  loop.train_and_evaluate(c, wd)
  return wd


@pytest.fixture(scope="module")
def rec(workdir):
  # 8 rows per global batch (one per fake device): one compilation of the sampler for all tests.
  return calrec_recommend.CalrecRecommender.from_workdir(workdir, batch_size=8)


@pytest.fixture(scope="module")
def width(rec):
  """Every item the samples can retrieve: no row of a test is cut at K."""
  return int(rec.c.num_samples) * int(rec.c.top_r)


def _history(rec, user):
  ds = rec.category().split.dataset
  return [str(x) for x in ds.item_ids[ds.sequence(user)]]


@pytest.fixture(scope="module")
def rows(rec, width, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("calrec_rows") / "recs.jsonl")
  users = [str(u) for u in rec.user_ids()[:N_USERS]]
  stats = rec.write_topk(out, width, users=users, rng_seed=SEED, progress=False, decimals=None)
  assert stats["rows"] == N_USERS and not stats["skipped"]
  with open(out) as f:
    return [json.loads(line) for line in f]


def test_file_row_equals_recommend_of_the_users_history(rec, rows, width):
  # Users 0..11 sit at rows 0..7 and 0..3 of two batches; alone, each is row 0 of a padded batch.
  for user in (0, 5, 10):
    got = rec.recommend(_history(rec, user), k=width, exclude_seen=False, rng_seed=SEED)
    assert got.items == rows[user]["items"]
    assert got.scores == rows[user]["scores"]
  assert sum(len(r["items"]) for r in rows) > 0  # the retrieval found something
  # A batch of histories equals the histories one by one.
  batch = rec.recommend([_history(rec, u) for u in (7, 2)], k=width, exclude_seen=False,
                        rng_seed=SEED)
  assert [b.items for b in batch] == [rows[7]["items"], rows[2]["items"]]
  # recommend_users reads the same whole sequences.
  assert rec.recommend_users([rows[4]["user"]], k=width, exclude_seen=False,
                             rng_seed=SEED)[0].items == rows[4]["items"]


def test_scores_follow_the_merge_order(rec, rows):
  assert rec.c.merge == "qrr"
  eps, n, r = float(rec.c.epsilon), int(rec.c.num_samples), int(rec.c.top_r)
  # -(best rank - epsilon (lists - 1)) for a rank in 1..top_r and 1..num_samples lists.
  possible = {round(rank - eps * extra, 9) for rank in range(1, r + 1) for extra in range(n)}
  for row in rows:
    s = np.asarray(row["scores"])
    assert len(row["items"]) == len(set(row["items"])) == len(s)
    assert np.all(np.diff(s) <= 1e-9)  # best first
    assert {round(-x, 9) for x in s} <= possible


def test_original_ids_round_trip(rec, rows):
  ds = rec.category().split.dataset
  assert any(ds.item_ids[d] != str(d) for d in range(1, 50))  # the two numberings differ
  assert [r["user"] for r in rows] == [str(u) for u in ds.user_ids[:N_USERS]]
  catalogue = set(str(x) for x in ds.item_ids[1:])
  assert all(set(r["items"]) <= catalogue for r in rows)
  for user in (0, 3):
    np.testing.assert_array_equal(rec.item_index(_history(rec, user)), ds.sequence(user))
  np.testing.assert_array_equal(rec.user_index([rows[3]["user"], rows[1]["user"]]), [3, 1])


def test_exclude_seen_removes_exactly_the_history(rec, width):
  ds = rec.category().split.dataset
  users = np.argsort(-ds.lengths, kind="stable")[:8]  # long histories: overlaps are likely
  histories = [_history(rec, u) for u in users]
  full = rec.recommend(histories, k=width, exclude_seen=False, rng_seed=SEED)
  kept = rec.recommend(histories, k=width, exclude_seen=True, rng_seed=SEED)
  overlaps = 0
  for h, f, e in zip(histories, full, kept):
    seen = set(h)
    assert not seen & set(e.items)
    want = [(i, s) for i, s in zip(f.items, f.scores) if i not in seen]
    assert list(zip(e.items, e.scores)) == want  # the same merge, the history filtered out
    overlaps += len(f.items) - len(want)
  assert overlaps > 0  # the filter had something to remove
  # The embedding ranking covers the catalogue: with K = n_items exactly the history is missing.
  n = ds.n_items
  e = rec.recommend(histories[0], k=n, exclude_seen=True, method="embedding")
  assert set(e.items) == set(str(x) for x in ds.item_ids[1:]) - set(histories[0])
  assert len(rec.recommend(histories[0], k=n, exclude_seen=False, method="embedding").items) == n


def test_unknown_ids_and_empty_histories(rec, workdir, tmp_path):
  history = _history(rec, 1)[:5]
  with pytest.raises(recommend.UnknownIdError, match="no-such-item"):
    rec.recommend(history + ["no-such-item"], k=5)
  assert calrec_recommend.UnknownIdError is recommend.UnknownIdError
  dropped = rec.recommend(["no-such-item"] + history, k=5, on_unknown="drop", rng_seed=SEED)
  assert dropped == rec.recommend(history, k=5, rng_seed=SEED)
  assert isinstance(dropped, recommend.Recommendation)
  with pytest.raises(ValueError, match="empty"):
    rec.recommend([], k=5)
  with pytest.raises(recommend.UnknownIdError, match="no-such-user"):
    rec.write_topk(str(tmp_path / "x.jsonl"), 5, users=["no-such-user"], progress=False)
  with pytest.raises(ValueError, match="unknown category"):
    rec.recommend(history, category="books")
  with pytest.raises(ValueError, match="CalrecRecommender"):
    recommend.Recommender.from_workdir(workdir)


def test_embedding_method_equals_numpy_cosine(rec):
  histories = [_history(rec, u) for u in (0, 4, 9, 20)]
  users = rec.user_vectors(histories).astype(np.float64)  # [4, D]
  items = rec.item_embeddings().astype(np.float64)  # [n_items, D]
  assert items.shape[0] == rec.category().split.dataset.n_items
  cos = ((users / np.linalg.norm(users, axis=1, keepdims=True)) @
         (items / np.linalg.norm(items, axis=1, keepdims=True)).T)  # [4, n_items]
  got = rec.recommend(histories, k=10, exclude_seen=False, method="embedding")
  item_ids = rec.item_ids()
  for row, g in zip(cos, got):
    dense = rec.item_index(g.items) - 1  # rows of `items`
    np.testing.assert_allclose(g.scores, row[dense], atol=1e-5)
    want = np.argsort(-row, kind="stable")[:10]
    np.testing.assert_allclose(g.scores, row[want], atol=1e-5)  # the same top scores
    # The same items wherever float32 rounding cannot swap neighbours.
    gaps = np.abs(np.diff(row[np.argsort(-row, kind="stable")[:11]]))  # [10]
    clear = (gaps > 1e-5) & np.concatenate([[True], gaps[:-1] > 1e-5])
    assert [str(x) for x in item_ids[want[clear] + 1]] == list(np.asarray(g.items)[clear])


def test_deterministic_for_a_seed(rec, width):
  histories = [_history(rec, u) for u in range(8)]
  a = rec.recommend(histories, k=width, exclude_seen=False, rng_seed=11)
  b = rec.recommend(histories, k=width, exclude_seen=False, rng_seed=11)
  c = rec.recommend(histories, k=width, exclude_seen=False, rng_seed=12)
  assert a == b
  assert any(x.items != y.items for x, y in zip(a, c))
  with pytest.raises(ValueError, match="rng_seed"):
    rec.recommend(histories[0], rng_seed=-1)
  with pytest.raises(ValueError, match="method"):
    rec.recommend(histories[0], method="bm25")


def test_merge_scores_match_each_rule():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 12, size=(5, 3, 6))  # [B, N, R], 0 = padding; many repeats
  bm25 = np.sort(rng.random((5, 3, 6)), axis=-1)[..., ::-1].astype(np.float32)
  eps = 0.5
  for rule in ranking.RULES:
    merged = ranking.merge_batch(ids, bm25, rule=rule, epsilon=eps, top_k=18)
    got = calrec_recommend.merge_scores(ids, bm25, merged, rule, eps)
    assert np.all(np.isneginf(got[merged == 0]))
    for b in range(5):
      real = merged[b][merged[b] > 0]
      s = got[b][:len(real)]
      assert np.all(np.diff(s) <= 1e-9), rule  # the merge's order
      for item, score in zip(real, s):
        where = np.argwhere(ids[b] == item)  # (list, rank) of every copy
        best_rank = where[:, 1].min() + 1
        want = {"round_robin": -best_rank,
                "quasi_round_robin": -(best_rank - eps * (len(set(where[:, 0])) - 1)),
                "max_score": max(bm25[b][l, r] for l, r in where)}[rule]
        assert score == pytest.approx(want), (rule, b, item)


def test_rerun_skips_and_other_settings_refuse(rec, tmp_path):
  out = str(tmp_path / "recs.jsonl")
  users = [str(u) for u in rec.user_ids()[:3]]
  first = rec.write_topk(out, 5, users=users, rng_seed=SEED, progress=False)
  assert not first["skipped"] and not os.path.exists(out + ".tmp")
  assert json.load(open(out + ".meta.json"))["settings"]["merge"] == "qrr"
  again = rec.write_topk(out, 5, users=users, rng_seed=SEED, progress=False)
  assert again["skipped"] and again["rows"] == 3
  with pytest.raises(FileExistsError, match="other settings"):
    rec.write_topk(out, 5, users=users, rng_seed=SEED + 1, progress=False)
  emb = rec.write_topk(out, 5, users=users, method="embedding", progress=False, overwrite=True)
  assert not emb["skipped"]
  with open(out) as f:
    assert all(len(json.loads(line)["items"]) == 5 for line in f)


def test_launcher_dispatches_calrec_workdirs(workdir, rec, tmp_path):
  users = tmp_path / "users.txt"
  wanted = [str(u) for u in rec.user_ids()[[6, 2]]]
  users.write_text("\n".join(wanted) + "\n")
  out = tmp_path / "sub.jsonl"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "recommend.py"), f"--workdir={workdir}",
       f"--users={users}", "--exclude_seen", "--top_k=7", f"--out={out}", "--noprogress",
       f"--rng_seed={SEED}", "--decimals=-1"],
      capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["user"] for r in rows] == wanted
  # Another process, 2 devices, another batch: the same items for the same history and seed.
  for user, r in zip((6, 2), rows):
    want = rec.recommend(_history(rec, user), k=7, exclude_seen=True, rng_seed=SEED)
    assert r["items"] == want.items and r["scores"] == want.scores
