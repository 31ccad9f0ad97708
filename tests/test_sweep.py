"""launch/sweep.py: runs every override, skips finished runs, writes csv/md/png."""

import csv
import os
import subprocess
import sys

from config_files import ROOT, write_small_config  # pylint: disable=g-bad-import-order



def test_sweep_runs_skips_and_tabulates(tmp_path):
  from test_loop import _write_pairs  # pylint: disable=g-import-not-at-top
  data = _write_pairs(str(tmp_path / "toy.txt"), n_users=60, n_items=20)
  cfg = tmp_path / "toy_sweep.py"
  write_small_config(cfg, data, 10, 5, "c.checkpoint.async_save = False",
                     sweep='[{"optim.lr": lr} for lr in (1e-3, 3e-3)]')
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  cmd = [sys.executable, os.path.join(ROOT, "launch", "sweep.py"), f"--config={cfg}",
         f"--workdir={tmp_path / 'sweep'}"]
  first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  with open(tmp_path / "sweep" / "sweep.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == ["lr=0.001", "lr=0.003"]
  assert all(float(r["test NDCG@10"]) >= 0 for r in rows)
  assert (tmp_path / "sweep" / "sweep_optim_lr.png").stat().st_size > 1000
  assert "| run |" in (tmp_path / "sweep" / "sweep.md").read_text()
  again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert again.returncode == 0 and again.stdout.count("done, skipped") == 2
  printed = subprocess.run(cmd + ["--print_commands"], capture_output=True, text=True, env=env)
  assert printed.stdout.count("launch/train.py") == 2 and "--config.optim.lr=0.003" in printed.stdout


def test_benchmark_mode_tabulates_speed_over_device_counts(tmp_path):
  from test_loop import _write_pairs  # pylint: disable=g-import-not-at-top
  data = _write_pairs(str(tmp_path / "toy.txt"), n_users=60, n_items=20)
  cfg = tmp_path / "toy_devices.py"
  write_small_config(cfg, data, 10, 5, sweep='[{"mesh.num_devices": n} for n in (1, 2)]')
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  cmd = [sys.executable, os.path.join(ROOT, "launch", "sweep.py"), "--mode=benchmark",
         f"--config={cfg}", f"--workdir={tmp_path / 'bench'}", "--benchmark_arg=--steps=3",
         "--benchmark_arg=--warmup=1", "--benchmark_arg=--eval_repeats=1"]
  first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  with open(tmp_path / "bench" / "sweep.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == ["num_devices=1", "num_devices=2"]
  assert [r["devices"] for r in rows] == ["1", "2"]  # the runs really used 1 and 2 devices
  assert all(float(r["train_sequences_per_second"]) > 0 for r in rows)
  assert all(0 < float(r["fraction_of_matmul_peak"]) < 1.5 for r in rows)
  assert (tmp_path / "bench" / "sweep_mesh_num_devices.png").stat().st_size > 1000
  again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert again.returncode == 0 and again.stdout.count("done, skipped") == 2


def test_throughput_config_sweeps():
  sys.path.insert(0, os.path.join(ROOT, "launch"))
  import sweep  # pylint: disable=g-import-not-at-top
  path = os.path.join(ROOT, "configs", "sasrec", "throughput.py")
  assert sweep.load_sweep(path) == [{"train.batch_size": b} for b in (64, 128, 256, 512, 1024)]
  assert sweep.load_sweep(path + ":devices") == [{"mesh.num_devices": n} for n in (1, 2, 4, 8)]
