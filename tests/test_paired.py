"""Paired per-user comparison of runs (seqrec_jax/paired.py, launch/compare_runs.py), checked
against direct numpy formulas and an exact enumeration of the sign-flip test."""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from seqrec_jax import metrics as metrics_lib
from seqrec_jax import paired

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_run(path, ranks, users=None, targets=None, valid_ranks=None):
  os.makedirs(path, exist_ok=True)
  n = len(ranks)
  users = np.arange(1, n + 1, dtype=np.int32) if users is None else users
  targets = np.arange(n, dtype=np.int32) % 7 + 1 if targets is None else targets
  np.savez(os.path.join(path, paired.RANKS_FILE), users=users,
           valid_targets=targets, valid_ranks=np.asarray(
               ranks if valid_ranks is None else valid_ranks, np.int32),
           test_targets=targets, test_ranks=np.asarray(ranks, np.int32))
  return str(path)


def test_per_row_matches_the_metric_definitions():
  ranks = np.array([0, 1, 4, 9, 10, 19, 20, 500])
  np.testing.assert_array_equal(metrics_lib.per_row(ranks, "HR@10"), [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_allclose(metrics_lib.per_row(ranks, "NDCG@20"),
                             [1.0, 1 / np.log2(3), 1 / np.log2(6), 1 / np.log2(11),
                              1 / np.log2(12), 1 / np.log2(21), 0, 0])
  np.testing.assert_allclose(metrics_lib.per_row(ranks, "MRR@5"), [1, 0.5, 0.2, 0, 0, 0, 0, 0])
  # The same sums as the jitted evaluation.
  sums = metrics_lib.ranking_sums(ranks, np.ones(len(ranks), np.float32), ks=(5, 10, 20))
  for key in metrics_lib.metric_keys((5, 10, 20)):
    np.testing.assert_allclose(metrics_lib.per_row(ranks, key).sum(), float(sums[key]),
                               rtol=1e-6, err_msg=key)
  for bad in ("NDCG", "ndcg@10", "HR@0", "AUC@10", "HR@x"):
    with pytest.raises(ValueError, match="unknown metric"):
      metrics_lib.per_row(ranks, bad)


def test_a_clearly_better_arm(tmp_path):
  rng = np.random.default_rng(0)
  n = 2000
  base = rng.integers(0, 60, size=n)
  a = [_write_run(tmp_path / f"a{s}", np.maximum(base - 8 + rng.integers(-2, 3, n), 0))
       for s in range(3)]
  b = [_write_run(tmp_path / f"b{s}", np.maximum(base + rng.integers(-2, 3, n), 0))
       for s in range(3)]
  out = paired.compare(a, b, ["HR@10", "NDCG@10"], n_resamples=2000, seed=1)
  assert out["users"] == n and out["stage"] == "test"
  for metric, r in out["metrics"].items():
    per_run = lambda dirs: [metrics_lib.per_row(paired.load_ranks(d)["ranks"], metric).mean()
                            for d in dirs]
    np.testing.assert_allclose(r["a_runs"], per_run(a))
    np.testing.assert_allclose(r["b_runs"], per_run(b))
    np.testing.assert_allclose(r["diff"], np.mean(per_run(a)) - np.mean(per_run(b)), atol=1e-12)
    np.testing.assert_allclose(r["a_std"], np.std(per_run(a)))
    assert r["diff"] > 0 and r["ci95"][0] > 0 and r["p_value"] < 0.001
    assert r["no_overlap"] and r["diff_over_spread"] > 1
    # The bootstrap interval's width is that of the normal approximation.
    pa = np.mean([metrics_lib.per_row(paired.load_ranks(d)["ranks"], metric) for d in a], 0)
    pb = np.mean([metrics_lib.per_row(paired.load_ranks(d)["ranks"], metric) for d in b], 0)
    half = 1.96 * np.std(pa - pb) / np.sqrt(n)
    np.testing.assert_allclose(r["ci95"][1] - r["ci95"][0], 2 * half, rtol=0.1)
  table = paired.to_markdown(out, "SRA-CL", "SASRec")
  assert "| NDCG@10 |" in table and "SRA-CL - SASRec" in table and "| yes |" in table
  assert table.rstrip().endswith(paired.CAVEAT)


def test_sign_flip_p_value_matches_exact_enumeration(tmp_path):
  a = _write_run(tmp_path / "a", [0, 0, 3, 1, 12, 0, 2, 9])
  b = _write_run(tmp_path / "b", [2, 5, 3, 0, 30, 4, 8, 9])
  r = paired.compare([a], [b], ["NDCG@10"], n_resamples=40_000, seed=3)["metrics"]["NDCG@10"]
  d = metrics_lib.per_row(np.array([0, 0, 3, 1, 12, 0, 2, 9]), "NDCG@10") - metrics_lib.per_row(
      np.array([2, 5, 3, 0, 30, 4, 8, 9]), "NDCG@10")
  flips = np.array([np.mean(np.array(s) * d) for s in itertools.product((-1, 1), repeat=8)])
  exact = np.mean(np.abs(flips) >= abs(d.mean()) - 1e-15)
  assert abs(r["p_value"] - exact) < 0.01, (r["p_value"], exact)
  assert r["a_std"] == 0 and r["diff_over_spread"] is None  # one run per arm: no seed spread


def test_identical_arms_are_not_different(tmp_path):
  ranks = np.random.default_rng(2).integers(0, 40, size=300)
  a = _write_run(tmp_path / "a", ranks)
  b = _write_run(tmp_path / "b", ranks)
  r = paired.compare([a], [b], ["HR@20"], n_resamples=500)["metrics"]["HR@20"]
  assert r["diff"] == 0 and r["ci95"] == [0.0, 0.0] and r["p_value"] == 1.0
  assert not r["no_overlap"]


def test_valid_stage_and_errors(tmp_path):
  a = _write_run(tmp_path / "a", [0, 50, 50], valid_ranks=[0, 0, 0])
  b = _write_run(tmp_path / "b", [50, 50, 50], valid_ranks=[0, 0, 0])
  assert paired.compare([a], [b], ["HR@10"], stage="valid",
                        n_resamples=10)["metrics"]["HR@10"]["diff"] == 0
  assert paired.compare([a], [b], ["HR@10"], n_resamples=10)["metrics"]["HR@10"]["diff"] > 0
  other_users = _write_run(tmp_path / "c", [0, 1, 2], users=np.array([1, 2, 4], np.int32))
  with pytest.raises(ValueError, match="different users"):
    paired.compare([a], [other_users], ["HR@10"])
  other_targets = _write_run(tmp_path / "d", [0, 1, 2], targets=np.array([3, 3, 3], np.int32))
  with pytest.raises(ValueError, match="different targets"):
    paired.compare([a, other_targets], [b], ["HR@10"])
  with pytest.raises(FileNotFoundError, match="--write_ranks"):
    paired.compare([a], [str(tmp_path / "nothing")], ["HR@10"])
  with pytest.raises(ValueError, match="unknown metric"):
    paired.compare([a], [b], ["Recall@10"])
  with pytest.raises(ValueError, match="at least one run"):
    paired.compare([], [b], ["HR@10"])
  negative = _write_run(tmp_path / "e", [0, -1, 2])
  with pytest.raises(ValueError, match="negative ranks"):
    paired.load_ranks(negative)
  with pytest.raises(ValueError, match="stage"):
    paired.load_ranks(a, "train")
  with pytest.raises(FileNotFoundError, match="no workdir matches"):
    paired.expand([str(tmp_path / "zz*")])
  assert paired.expand([str(tmp_path / "[ab]")]) == [a, b]


def test_rank_profile_against_direct_counts(tmp_path):
  """Band shares, HR@K and median ranks equal direct numpy counts over the 0-based ranks."""
  rng = np.random.default_rng(3)
  n = 500
  a = [_write_run(tmp_path / f"a{s}", rng.integers(0, 40, size=n)) for s in range(2)]
  b = [_write_run(tmp_path / f"b{s}", rng.integers(0, 900, size=n)) for s in range(3)]
  prof = paired.rank_profile({"new": a, "old": b}, edges=(1, 5, 10, 20))
  assert prof["bands"] == ["1", "2-5", "6-10", "11-20", "> 20"] and prof["users"] == n
  ks = np.asarray(prof["ks"])
  assert ks[0] == 1 and ks[-1] >= 900 and np.all(np.diff(ks) > 0)
  for name, dirs in (("new", a), ("old", b)):
    got = prof["arms"][name]
    for j, d in enumerate(dirs):
      r = paired.load_ranks(d)["ranks"] + 1  # 1-based
      want = [np.mean(r == 1), np.mean((r >= 2) & (r <= 5)), np.mean((r >= 6) & (r <= 10)),
              np.mean((r >= 11) & (r <= 20)), np.mean(r > 20)]
      np.testing.assert_allclose(got["shares"][j], want)
      np.testing.assert_allclose(got["hr_at_k"][j], [np.mean(r <= k) for k in ks])
      assert got["median_rank"][j] == np.median(r)
    np.testing.assert_allclose(got["share_mean"], np.mean(got["shares"], 0))
    np.testing.assert_allclose(np.sum(got["shares"], 1), 1.0)
  text = paired.profile_markdown(prof)
  diff_row = next(line for line in text.splitlines() if line.startswith("| new - old |"))
  first = float(diff_row.split("|")[3])
  np.testing.assert_allclose(first, prof["arms"]["new"]["share_mean"][0] -
                             prof["arms"]["old"]["share_mean"][0], atol=1e-4)
  paired.save_profile_plot(str(tmp_path / "r.png"), prof)
  assert (tmp_path / "r.png").stat().st_size > 1000
  other = _write_run(tmp_path / "other", rng.integers(0, 40, size=n),
                     users=np.arange(2, n + 2, dtype=np.int32))
  with pytest.raises(ValueError, match="different users"):
    paired.rank_profile({"new": a, "x": [other]})
  for bad in ((), (5, 1), (0, 3)):
    with pytest.raises(ValueError, match="rank band edges"):
      paired.rank_profile({"new": a}, edges=bad)
  with pytest.raises(ValueError, match="at least one run"):
    paired.rank_profile({"new": a, "none": []})


def test_cli_writes_the_table_and_json(tmp_path):
  rng = np.random.default_rng(5)
  for s in range(2):
    _write_run(tmp_path / f"seed={s}", rng.integers(0, 15, size=100))
    _write_run(tmp_path / f"base_seed={s}", rng.integers(0, 40, size=100))
  cmd = [sys.executable, os.path.join(ROOT, "launch", "compare_runs.py"),
         f"--a={tmp_path}/seed=*", f"--b={tmp_path}/base_seed=*", "--a_name=new",
         "--b_name=old", "--metrics=HR@10", "--n_resamples=200", f"--md={tmp_path}/t.md",
         f"--out={tmp_path}/t.json", f"--plot={tmp_path}/t.png"]
  got = subprocess.run(cmd, capture_output=True, text=True, check=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert "new - old" in got.stdout and "100 users" in got.stdout
  assert "Where the targets rank" in got.stdout and "| new - old |" in got.stdout
  assert (tmp_path / "t.png").stat().st_size > 1000
  import json  # pylint: disable=g-import-not-at-top
  with open(tmp_path / "t.json") as f:
    result = json.load(f)
  assert len(result["a"]) == 2 and result["metrics"]["HR@10"]["diff"] > 0
  assert open(tmp_path / "t.md").read() in got.stdout
