"""Preemption: SIGTERM finishes the step, checkpoints, exits 0; relaunch == uninterrupted.
A half-written checkpoint (a kill -9 mid-save) never breaks resumption."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from seqrec_jax import loop

from test_loop import _write_pairs, small_config  # pylint: disable=g-bad-import-order

from config_files import ROOT, write_small_config  # pylint: disable=g-bad-import-order



def _run(cmd, env):
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_sigterm_checkpoints_and_resumes_exactly(tmp_path):
  data = _write_pairs(str(tmp_path / "toy.txt"), n_users=100, n_items=30)
  cfg = tmp_path / "cfg.py"
  write_small_config(cfg, data, 400, 100, "c.train.log_every_steps = 5", "c.train.patience = 0")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  base = [sys.executable, os.path.join(ROOT, "launch", "train.py"), f"--config={cfg}",
          "--config.train.progress=false"]
  wd = tmp_path / "pre"
  proc = subprocess.Popen(base + [f"--workdir={wd}"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = wd / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline:  # wait until training is under way, then signal
    if metrics.exists() and any(json.loads(l)["step"] >= 20 for l in open(metrics)):
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  steps = sorted(int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit())
  assert steps and steps[-1] < 400, steps  # stopped early, with a checkpoint at the stop step
  assert f"stopping at step {steps[-1]} (a termination signal)" in err
  assert not (wd / "results.json").exists()
  resumed = _run(base + [f"--workdir={wd}"], env)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  straight = _run(base + [f"--workdir={tmp_path / 'straight'}"], env)
  assert straight.returncode == 0
  a = json.load(open(wd / "results.json"))
  b = json.load(open(tmp_path / "straight" / "results.json"))
  assert a["test"] == b["test"] and a["valid"] == b["valid"]


def test_half_written_checkpoint_is_ignored(tmp_path):
  """Orbax commits a step by renaming its temporary folder; a kill -9 mid-save leaves only the
  temporary folder, which resumption must skip in favour of the last complete step."""
  data = _write_pairs(str(tmp_path / "toy.txt"), n_users=100, n_items=30)
  straight = loop.train_and_evaluate(small_config(data), str(tmp_path / "a"))
  c = small_config(data)
  c.train.stop_at_step = 20
  loop.train_and_evaluate(c, str(tmp_path / "b"))
  ckpts = tmp_path / "b" / "checkpoints"
  # Fake the remains of a save of step 30 killed half way.
  shutil.copytree(ckpts / "20", ckpts / "30.orbax-checkpoint-tmp-1234567890")
  for f in (ckpts / "30.orbax-checkpoint-tmp-1234567890").rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  resumed = loop.train_and_evaluate(small_config(data), str(tmp_path / "b"))
  assert resumed["test"] == straight["test"]


def test_latest_checkpoint_waits_for_the_best_params_it_names(tmp_path):
  """The loop metadata of a step's checkpoint names the best step: the best parameters' async
  save must be committed before that checkpoint starts, never after."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from seqrec_jax import checkpointing  # pylint: disable=g-import-not-at-top
  ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=True)
  events = []
  best_wait, latest_save = ckpt._best.wait_until_finished, ckpt._latest.save
  ckpt._best.wait_until_finished = lambda: (events.append("best committed"), best_wait())[1]
  ckpt._latest.save = lambda *a, **k: (events.append("latest save"), latest_save(*a, **k))[1]
  params = {"w": jnp.arange(4.0)}
  ckpt.save_best(5, params, {"step": 5})
  events.append("save_best returned")  # (Orbax may wait on its own inside save_best)
  ckpt.save(5, {"params": params}, {"best_step": 5})
  after = events[events.index("save_best returned") + 1:]
  assert after == ["best committed", "latest save"], events
  ckpt.close()
  again = checkpointing.Checkpointer(str(tmp_path))
  assert again.latest_step() == 5 and again.best_step() == 5
  restored, meta = again.restore_best(params)
  assert meta["step"] == 5 and float(restored["w"][3]) == 3.0
  again.close()


def test_atomic_write_replaces_whole_files_with_plain_permissions(tmp_path):
  import pytest  # pylint: disable=g-import-not-at-top
  from seqrec_jax import fileio  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "results.json")
  fileio.atomic_write(path, lambda f: f.write("old"), mode="w")
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600

  def fail(f):
    f.write("half")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError, match="disk full"):
    fileio.atomic_write(path, fail, mode="w")
  assert open(path).read() == "old" and os.listdir(tmp_path) == ["results.json"]  # no temp left


def test_atomic_copy_copies_bytes_and_leaves_no_temp_on_a_missing_source(tmp_path):
  import pytest  # pylint: disable=g-import-not-at-top
  from seqrec_jax import fileio  # pylint: disable=g-import-not-at-top
  src, dst = tmp_path / "a.bin", tmp_path / "out" / "b.bin"
  dst.parent.mkdir()
  data = os.urandom(3 << 20)  # more than one 1 MiB chunk
  src.write_bytes(data)
  fileio.atomic_copy(str(src), str(dst))
  assert dst.read_bytes() == data
  dst.write_bytes(b"old")
  with pytest.raises(FileNotFoundError):
    fileio.atomic_copy(str(tmp_path / "missing"), str(dst))
  assert dst.read_bytes() == b"old" and os.listdir(dst.parent) == ["b.bin"]
