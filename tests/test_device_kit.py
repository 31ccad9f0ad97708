"""benchmarks/device/kit.py: slim semantic tables travel without prefix embeddings and come back
bit for bit; other data is refused."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from config_files import ROOT  # pylint: disable=g-bad-import-order
from seqrec_jax.data import leave_one_out
from seqrec_jax.data import load_dataset
from sracl_jax.semantic import pipeline
from test_semantic_pipeline import _cfg  # pylint: disable=g-bad-import-order


_KIT = []


def _kit():
  if _KIT:
    return _KIT[0]
  spec = importlib.util.spec_from_file_location(
      "device_kit", os.path.join(ROOT, "benchmarks", "device", "kit.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  _KIT.append(mod)
  return mod


def _split(path, n_users=30, shift=0):
  lines = [f"{u} {1 + (u * 7 + j * (3 + u % 4) + shift) % 25}" for u in range(1, n_users + 1)
           for j in range(6 + u % 5)]
  path.write_text("\n".join(lines) + "\n")
  return leave_one_out(load_dataset("pairs", str(path)))


@pytest.mark.parametrize("mode", ["items", "user"])
def test_slim_tables_restore_bit_for_bit(tmp_path, monkeypatch, mode):
  kit = _kit()
  split = _split(tmp_path / "data.txt")
  ds = split.dataset
  monkeypatch.setattr(pipeline, "_encoder", lambda *a: (_ for _ in ()).throw(AssertionError))
  rng = np.random.default_rng(5)
  np.save(tmp_path / "items.npy", rng.normal(size=(ds.n_items + 1, 16)).astype(np.float32))
  extra = {}
  if mode == "user":
    np.save(tmp_path / "users.npy", rng.normal(size=(ds.n_users, 16)).astype(np.float32))
    extra["prefix_embeddings_npy"] = str(tmp_path / "users.npy")
  cfg = _cfg(k=3, user_mode=mode, max_history_items=4,
             item_embeddings_npy=str(tmp_path / "items.npy"), **extra)
  full = pipeline.build_semantic_tables(split, cfg, str(tmp_path / "full"), progress=False)
  entry = kit.slim(str(tmp_path / "full"), str(tmp_path / "slim"))
  slim_files = set(os.listdir(tmp_path / "slim"))
  assert kit.PREFIX not in slim_files and kit.MANIFEST in slim_files
  slim_bytes = sum(os.path.getsize(tmp_path / "slim" / f) for f in slim_files)
  assert entry["rebuild"] == ("mean_item_vectors" if mode == "items" else "rows_inverse")
  if mode == "user":  # one row per user instead of one per prefix
    assert np.load(tmp_path / "slim" / "prefix_rows.npy").shape[0] <= ds.n_users < split.n_train
  assert slim_bytes < sum(os.path.getsize(tmp_path / "full" / f)
                          for f in os.listdir(tmp_path / "full") if f != "cache")
  # Before its restore, a slim copy is never recomputed in place (ScaNN would draw new tables).
  before = {f: (tmp_path / "slim" / f).read_bytes() for f in slim_files}
  with pytest.raises(ValueError, match="slim semantic tables .* not recomputed in place"):
    pipeline.build_semantic_tables(split, cfg, str(tmp_path / "slim"), progress=False)
  assert {f: (tmp_path / "slim" / f).read_bytes() for f in os.listdir(tmp_path / "slim")} == before
  kit.restore(str(tmp_path / "slim"), split, cfg)
  back = pipeline.load_tables(str(tmp_path / "slim"))
  for name in pipeline.TABLE_NAMES:
    np.testing.assert_array_equal(getattr(back, name), getattr(full, name))
  # Training there loads the restored copy as it is: the fingerprint matches, nothing is rebuilt.
  again = pipeline.build_semantic_tables(split, cfg, str(tmp_path / "slim"), progress=False)
  assert again.stats.get("loaded_from_out_dir") is True
  # Tables of other data are refused, naming the directory.
  (tmp_path / "other").mkdir()
  other = _split(tmp_path / "other" / "data.txt", shift=1)
  with pytest.raises(ValueError, match="other data or settings"):
    kit.restore(str(tmp_path / "slim"), other, cfg)
  # A rebuild that does not match the original bytes is refused too.
  manifest = (tmp_path / "slim" / kit.MANIFEST)
  manifest.write_text(manifest.read_text().replace(entry["sha256"], "0" * 64))
  with pytest.raises(ValueError, match="SHA-256 mismatch"):
    kit.restore(str(tmp_path / "slim"), split, cfg)


@pytest.mark.parametrize("script", ["benchmarks/cpu/campaign.sh", "benchmarks/device/run_jobs.sh",
                                    "benchmarks/device/make_kit.sh"])
def test_long_running_scripts_are_parsed_whole_before_they_run(script):
  # bash reads a script as it runs it: an edit or a checkout of the file mid-run (the CPU campaign
  # runs for days) shifts what it reads next (session 13: a syntax error ended the campaign). One
  # { ... } block ending in exit is parsed whole first, so the run keeps the text it started with.
  path = os.path.join(ROOT, script)
  with open(path) as f:
    lines = f.read().splitlines()
  body = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
  assert body[0] == "{", f"{script}: the first command must open the block, got {body[0]!r}"
  assert body[-2:] == ["exit", "}"], f"{script}: must end with 'exit' and '}}', got {body[-2:]}"
  subprocess.run(["bash", "-n", path], check=True)


def test_campaign_status_times_epochs_by_training_seconds_not_file_times(tmp_path):
  """A run stopped between sessions: its checkpoints' mtimes are hours apart, its recorded
  training seconds are not; --status must estimate from the latter."""
  import json  # pylint: disable=g-import-not-at-top
  run = tmp_path / "toys_compare" / "seed=2025"
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.json").write_text(json.dumps(
      {"train": {"early_stop_metric": "MRR@10", "patience": 10}}))
  rows = [{"step": s, "split": "valid", "MRR@10": m} for s, m in [(400, 0.02), (800, 0.03)]]
  (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  for step, seconds, mtime in [(400, 1000.0, 1e9), (800, 1240.0, 1e9 + 36000)]:  # 10 h apart
    meta = run / "checkpoints" / str(step) / "meta"
    meta.mkdir(parents=True)
    (meta / "metadata").write_text(json.dumps({"train_seconds": seconds}))
    os.utime(run / "checkpoints" / str(step), (mtime, mtime))
  out = subprocess.run(["bash", os.path.join(ROOT, "benchmarks/cpu/campaign.sh"), "--status",
                        "toys_compare"], env=dict(os.environ, CPU_RUNS=str(tmp_path)),
                       capture_output=True, text=True, check=True).stdout
  assert "best valid MRR@10 0.03000 at step 800" in out, out
  # 240 training seconds over 400 steps, one evaluation per 400 steps: 4.0 min, 10 more to go.
  assert "4.0 min per evaluation; at least 10 more evaluations (~0.7 h)" in out, out


def test_alone_jobs_run_a_compare_jobs_backbone_arm_only(tmp_path):
  """JOB@alone: the compare job's dataset, config and folder, restricted to its backbone-alone
  runs (a pattern over the names the sweep writes: its three seeds); refused for jobs without
  that arm."""
  script = os.path.join(ROOT, "benchmarks/device/run_jobs.sh")
  functions = ('source <(sed -n "/^spec() {/,/^}/p;/^spec_of() {/,/^}/p" "$0"); '
               'spec "$1" || echo refused')
  spec = lambda job: subprocess.run(["bash", "-c", functions, script, job], check=True,
                                    capture_output=True, text=True).stdout.split()
  plain, alone = spec("beauty_bert4rec"), spec("beauty_bert4rec@alone")
  assert alone[:4] == plain[:4] == ["beauty", "items", "configs/sracl/beauty.py:items,bert4rec,compare",
                                    "6"]
  assert alone[4] == "--only=alpha=0.0_beta=0.0_seed=*"  # every seed the sweep lists
  assert spec("beauty_missing@alone") == ["refused"] and spec("no_such_job") == ["refused"]
  # The pattern selects the sweep's own names (launch/sweep.py refuses one that matches none).
  out = subprocess.run([sys.executable, os.path.join(ROOT, "launch/sweep.py"),
                        f"--config={os.path.join(ROOT, alone[2].split(':')[0])}:"
                        f"{alone[2].split(':')[1]}", f"--workdir={tmp_path}", "--print_commands",
                        alone[4]], check=True, capture_output=True, text=True, cwd=ROOT).stdout
  assert [line.split("alpha=0.0_beta=0.0_seed=")[1][:4] for line in out.splitlines()] == [
      "2024", "2025", "2026"]
