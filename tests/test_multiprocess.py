"""2 processes x 4 CPU devices (gloo on 127.0.0.1) train like 1 process x 8 devices, and their
checkpoints resume across process counts."""

import json
import os
import socket
import subprocess
import sys

import pytest

from config_files import ROOT, write_small_config  # pylint: disable=g-bad-import-order



def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(cfg, workdir, n_proc, devices_per_proc, extra=()):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_proc} "
             "--xla_cpu_collective_call_terminate_timeout_seconds=900",  # see conftest.py
             JAX_PLATFORMS="cpu")
  base = [sys.executable, os.path.join(ROOT, "launch", "train.py"), f"--config={cfg}",
          f"--workdir={workdir}", "--config.train.progress=false", *extra]
  if n_proc == 1:
    procs = [subprocess.Popen(base, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)]
  else:
    addr = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(base + [f"--coordinator_address={addr}",
                                      f"--num_processes={n_proc}", f"--process_id={i}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(n_proc)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  from test_loop import _write_pairs  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("mp")
  data = _write_pairs(str(root / "toy.txt"), n_users=100, n_items=30)
  path = root / "mp_config.py"
  write_small_config(path, data, 30, 10, "c.model.dropout = c.model.attn_dropout = 0.2",
                     "c.train.patience = 0", "c.checkpoint.async_save = False")
  return str(path)


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def one_process(cfg, tmp_path_factory):
  """The whole run in 1 process x 8 devices: the reference of both tests below."""
  workdir = str(tmp_path_factory.mktemp("one"))
  _launch(cfg, workdir, 1, 8)
  return _results(workdir)


def test_two_processes_match_one_process(cfg, one_process, tmp_path):
  _launch(cfg, str(tmp_path / "two"), 2, 4)
  one, two = one_process, _results(tmp_path / "two")
  assert two["processes"] == 2 and two["devices"] == 8 and one["processes"] == 1
  for k, v in one["test"].items():
    assert two["test"][k] == pytest.approx(v, abs=0.02), k
  # Only process 0 wrote the metrics file: one row per evaluation.
  rows = [json.loads(l) for l in open(tmp_path / "two" / "metrics.jsonl")]
  assert [r["step"] for r in rows if r["split"] == "valid"] == [10, 20, 30]


def test_checkpoint_resumes_across_process_counts(cfg, one_process, tmp_path):
  _launch(cfg, str(tmp_path / "a"), 2, 4, ["--config.train.stop_at_step=15"])
  _launch(cfg, str(tmp_path / "a"), 1, 8)  # 2-process checkpoint -> 1 process
  _launch(cfg, str(tmp_path / "b"), 1, 8, ["--config.train.stop_at_step=15"])
  _launch(cfg, str(tmp_path / "b"), 2, 4)  # 1-process checkpoint -> 2 processes
  for wd in ("a", "b"):  # both as the straight run
    for k, v in one_process["test"].items():
      assert _results(tmp_path / wd)["test"][k] == pytest.approx(v, abs=0.02), (wd, k)


CALREC_CONFIG = '''
from configs.calrec import ml100k

def get_config(arg=None):
  c = ml100k.get_config("tiny")
  c.train.num_steps, c.train.eval_every_steps = 10, 5
  c.calrec.test_users, c.calrec.eval_users, c.calrec.num_samples = 32, 32, 1
  c.model.dropout = 0.0
  c.checkpoint.async_save = False
  return c
'''


def test_calrec_two_processes_match_one_process(tmp_path):
  path = tmp_path / "calrec_mp.py"
  path.write_text(CALREC_CONFIG)
  _launch(str(path), str(tmp_path / "one"), 1, 8)
  _launch(str(path), str(tmp_path / "two"), 2, 4)
  one, two = _results(tmp_path / "one"), _results(tmp_path / "two")
  assert two["processes"] == 2 and one["processes"] == 1
  assert set(one["test"]) == set(two["test"])
  for k, v in one["test"].items():
    assert two["test"][k] == pytest.approx(v, abs=0.02), k
