"""Config files and the command-line launcher, as a user runs them."""

import glob
import json
import os
import subprocess
import sys

import pytest
from ml_collections import config_flags  # noqa: F401  (same loader the launcher uses)

from seqrec_jax.config_check import validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True))
CONFIGS = [c for c in CONFIGS if not c.endswith("__init__.py")]


def _load(path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(c, ROOT) for c in CONFIGS])
def test_every_config_loads_full_and_tiny(path):
  mod = _load(path)
  full, tiny = mod.get_config(), mod.get_config("tiny")
  validate_config(full)
  validate_config(tiny)
  assert tiny.train.num_steps > 0 and tiny.train.num_steps <= 500
  for overrides in mod.get_sweep():
    for key in overrides:
      node = full
      for part in key.split(".")[:-1]:
        node = node[part]
      assert key.split(".")[-1] in node, f"sweep key {key} is not a config key"
  with pytest.raises(ValueError, match="unknown config argument"):
    mod.get_config("tinyy")


def _train(args, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), *args],
                        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)


def test_launcher_runs_tiny_ml100k_with_overrides(tmp_path):
  pytest.importorskip("recbole", reason="ml-100k ships in the recbole wheel")
  wd = tmp_path / "run"
  proc = _train(["--config", os.path.join(ROOT, "configs/sasrec/ml100k.py:tiny"),
                 "--workdir", str(wd), "--config.train.num_steps=20",
                 "--config.train.eval_every_steps=10", "--config.model.n_layers=1",
                 "--config.train.progress=false"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(wd / "results.json") as f:
    results = json.load(f)
  assert results["steps"] == 20
  assert "NDCG@10" in proc.stdout  # the final table
  with open(wd / "config.json") as f:
    assert json.load(f)["model"]["n_layers"] == 1
  # launch/eval.py re-evaluates the best checkpoint and rewrites the per-user ranks.
  os.remove(wd / "eval_ranks.npz")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "eval.py"),
                         f"--workdir={wd}", "--write_ranks", f"--out={tmp_path / 'e.json'}"],
                        capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "NDCG@10" in proc.stdout and f"best step {results['best_step']}" in proc.stdout
  with open(tmp_path / "e.json") as f:
    assert json.load(f)["test"] == results["test"]
  assert (wd / "eval_ranks.npz").exists()


def test_launcher_rejects_unknown_config_key(tmp_path):
  proc = _train(["--config", os.path.join(ROOT, "configs/sasrec/ml100k.py:tiny"),
                 "--workdir", str(tmp_path / "x"), "--config.optim.lrr=0.1"], tmp_path)
  assert proc.returncode != 0
  assert "lrr" in proc.stderr


def test_launcher_reports_malformed_data_line(tmp_path):
  bad = tmp_path / "Bad.txt"
  bad.write_text("1 1\n1 2\n1 3\n57 x9\n")
  proc = _train(["--config", os.path.join(ROOT, "configs/sasrec/beauty.py:tiny"),
                 "--workdir", str(tmp_path / "x"), f"--config.data.path={bad}"], tmp_path)
  assert proc.returncode != 0
  assert "Bad.txt:4" in proc.stderr
