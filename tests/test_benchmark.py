"""launch/benchmark.py runs on tiny configs and reports positive, consistent figures."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("config,key", [("configs/sasrec/ml100k.py:tiny", "eval_users_per_second"),
                                        ("configs/calrec/ml100k.py:tiny",
                                         "generated_tokens_per_second")])
def test_benchmark_reports(tmp_path, config, key):
  out = tmp_path / "bench.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  subprocess.run([sys.executable, os.path.join(ROOT, "launch", "benchmark.py"), "--config",
                  os.path.join(ROOT, config), "--steps", "3", "--warmup", "1", "--eval_repeats",
                  "1", "--out", str(out)], check=True, cwd=ROOT, env=env,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  report = json.loads(out.read_text())["ours"]
  assert report[key] > 0
  assert report["step_seconds_median"] > 0
  # Throughput comes from the pipelined windows (3 by default), latency from single steps.
  windows = report["step_seconds_pipelined_windows"]
  assert len(windows) == 3 and all(w > 0 for w in windows)
  assert report["step_seconds_pipelined"] == pytest.approx(sorted(windows)[1])
  per_step = (report["batch_size"] * report["max_tokens"] if "max_tokens" in report
              else report["batch_size"])
  rate = report.get("train_sequences_per_second", report.get("train_tokens_per_second"))
  if "max_tokens" not in report:
    assert rate == pytest.approx(per_step / report["step_seconds_pipelined"])
  else:
    assert rate >= per_step / report["step_seconds_pipelined"]  # + item-only tokens
  assert report["achieved_model_flops_per_second"] > 0
  # The fraction is model FLOP/s over the matmul peak measured in the same run.
  assert report["fraction_of_matmul_peak"] == pytest.approx(
      report["achieved_model_flops_per_second"] / report["matmul_peak_flops_per_second"])
