"""Speed benchmark of a config: training throughput, evaluation throughput, compile time, memory,
model FLOP/s against this machine's measured matmul peak, optionally next to the RecBole peer.
For a CALRec config: train tokens/s and model FLOPs utilisation of the step, and generation
tokens/s with the KV cache.

  python launch/benchmark.py --config configs/sasrec/beauty.py --out bench.json \
      [--peer_python /work/peers-venv/bin/python --peer_dataset beauty]

Everything is measured in one process, one run: the matmul peak (median of 2048^3 float32
matmuls), then our train step (median over --steps steps, host batching included), the full-ranking
evaluation of every test user (median of --eval_repeats passes), and last the peer in a subprocess
(so the two never share the CPU).  Quote medians and the ratios from one run.
"""

import json
import os
import platform
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from seqrec_jax import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 60, "Timed training steps (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed steps after compilation.")
_WINDOWS = flags.DEFINE_integer(
    "pipelined_windows", 3, "Throughput: windows of --steps steps dispatched back to back, as the "
    "training loop runs them (the host builds the next batch while the device computes), blocked "
    "at each window's end; the median window gives the training throughput figures.")
_EVAL_REPEATS = flags.DEFINE_integer("eval_repeats", 3, "Timed passes over all test users.")
_PEAK_DTYPE = flags.DEFINE_enum("peak_dtype", "float32", ["float32", "bfloat16"],
                                "dtype of the matmul whose speed is the peak (the MFU denominator); "
                                "bfloat16 for a bf16 model on an accelerator.")
_PEAK_N = flags.DEFINE_integer("peak_n", 2048, "Size n of the n x n x n peak matmul (8192 on a GPU).")
_OUT = flags.DEFINE_string("out", None, "Write the figures as JSON here.")
_PEER_PYTHON = flags.DEFINE_string("peer_python", None,
                                   "Python of the RecBole peer venv; if set, time the peer too.")
_PEER_DATASET = flags.DEFINE_enum("peer_dataset", None, ["ml-100k", "beauty"],
                                  "Dataset name for the peer runner.")
_PEER_EPOCHS = flags.DEFINE_integer("peer_epochs", 2, "Timed peer training epochs.")
_SRACL_PEER_PYTHON = flags.DEFINE_string(
    "sracl_peer_python", None,
    "Python of the peer venv; if set (SRA-CL configs), time the reference SRA-CL code too "
    "(benchmarks/peers/sracl_reference.py, Beauty, its train.sh settings).")
_SRACL_PEER_BATCHES = flags.DEFINE_integer("sracl_peer_batches", 20,
                                           "Timed batches of the reference SRA-CL.")
_PEER_THREADS = flags.DEFINE_integer("peer_threads", 2, "Threads of the SRA-CL reference.")
flags.mark_flags_as_required(["config"])


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times)), times


def matmul_peak_flops(n: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
  """Median FLOP/s of an n x n x n matmul of `dtype` on the default device (random inputs)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  med, _ = _median_time(lambda: f(a, a).block_until_ready(), repeats)
  return 2.0 * n ** 3 / med


def _time_train_steps(exp):
  """Compiles the train step, runs the warm-up, then times --steps steps (host batching included).

  Two timings: each step alone (dispatch, then wait for its result: the latency), and windows of
  steps dispatched back to back as `loop.train_and_evaluate` runs them (the throughput).

  Returns:
    (state after the timed steps, compile seconds, XLA's FLOPs per step, per-step times,
    per-window mean step times).
  """
  state, it = exp.state, exp.iterator
  batch = exp.train_step.device_batch(next(it))
  t = time.perf_counter()
  compiled_train = exp.train_step.jitted.lower(state, batch, exp.consts).compile()
  train_compile_s = time.perf_counter() - t
  cost = compiled_train.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  for _ in range(_WARMUP.value):
    state, m = exp.train_step(state, next(it))
  jax.block_until_ready(m)
  step_times = []
  for _ in range(_STEPS.value):
    t = time.perf_counter()
    state, m = exp.train_step(state, next(it))
    jax.block_until_ready(m)
    step_times.append(time.perf_counter() - t)
  window_times = []
  for _ in range(_WINDOWS.value):
    t = time.perf_counter()
    for _ in range(_STEPS.value):
      state, m = exp.train_step(state, next(it))
    jax.block_until_ready((state, m))
    window_times.append((time.perf_counter() - t) / _STEPS.value)
  return state, train_compile_s, xla_flops, step_times, window_times


def _step_stats(build_s: float, compile_s: float, step_times, window_times) -> dict:
  """The timing fields both train benchmarks report."""
  return {
      "build_seconds": build_s,
      "train_compile_seconds": compile_s,
      "step_seconds_median": float(np.median(step_times)),
      "step_seconds_p10_p90": [float(np.percentile(step_times, 10)),
                               float(np.percentile(step_times, 90))],
      "step_seconds_pipelined": float(np.median(window_times)),
      "step_seconds_pipelined_windows": [float(w) for w in window_times],
      "throughput_basis": "step_seconds_pipelined (steps dispatched back to back, as the "
                          "training loop runs them)",
  }


def benchmark_ours(config) -> dict:
  """Times our train step and full-ranking evaluation on config's data and model."""
  t0 = time.perf_counter()
  exp = loop.build_experiment(config)
  build_s = time.perf_counter() - t0
  part = exp.partitioner
  state, train_compile_s, xla_flops, step_times, window_times = _time_train_steps(exp)
  steps = _step_stats(build_s, train_compile_s, step_times, window_times)
  step_s = steps["step_seconds_pipelined"]

  t = time.perf_counter()
  exp.evaluate(state.params, "test")  # includes the eval step's compilation
  first_eval_s = time.perf_counter() - t
  eval_s, _ = _median_time(lambda: exp.evaluate(state.params, "test"), _EVAL_REPEATS.value)
  n_eval = len(exp.split.eval_users)

  model_cfg = exp.model.config
  if hasattr(exp.task, "train_flops_per_example"):  # SRA-CL: 2 + k + 2 encoder passes
    flops_seq = exp.task.train_flops_per_example()
  else:
    flops_seq = model_cfg.train_flops_per_sequence(
        "masked" if config.task.name == "cloze" else config.model.loss_positions)
  batch_size = config.train.batch_size
  return {
      "dataset": exp.split.dataset.summary(),
      "train_sequences": int(len(exp.split.train_targets)),
      "batch_size": batch_size,
      "steps_per_epoch": exp.steps_per_epoch,
      "devices": part.mesh.size,
      "mesh": dict(part.mesh.shape),
      **steps,
      "eval_first_pass_seconds_incl_compile": first_eval_s,
      "train_sequences_per_second": batch_size / step_s,
      "seconds_per_epoch": exp.steps_per_epoch * step_s,
      "eval_users": n_eval,
      "eval_seconds_median": eval_s,
      "eval_users_per_second": n_eval / eval_s,
      "model_flops_per_train_sequence": flops_seq,
      "xla_flops_per_train_step": xla_flops,
      "achieved_model_flops_per_second": flops_seq * batch_size / step_s,
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
      # SRA-CL's length buckets (model FLOPs above count every pass at full width):
      **(exp.task.bucket_summary(batch_size) if hasattr(exp.task, "bucket_summary") else {}),
  }


def benchmark_calrec(config) -> dict:
  """CALRec: train tokens/s and model FLOP/s of the step; generation tokens/s with the KV cache."""
  from calrec_jax import generate  # pylint: disable=g-import-not-at-top
  from calrec_jax.text import examples  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  exp = loop.make_experiment(config)
  build_s = time.perf_counter() - t0
  c = config.calrec
  state, train_compile_s, xla_flops, step_times, window_times = _time_train_steps(exp)
  steps = _step_stats(build_s, train_compile_s, step_times, window_times)
  step_s = steps["step_seconds_pipelined"]
  dcfg = exp.model.config
  b = config.train.batch_size
  joint_tokens = b * c.max_tokens
  item_tokens = b * c.max_item_tokens if (c.alpha or c.beta) else 0
  flops_step = (dcfg.train_flops_per_token(c.max_tokens) * joint_tokens +
                (dcfg.train_flops_per_token(c.max_item_tokens) * item_tokens))

  # Generation: prompts of the evaluation's length, every row decoding max_new_tokens tokens.
  cat = exp.categories[0]
  users = cat.split.eval_users[:config.eval.batch_size]
  histories = np.stack([np.pad(cat.split.dataset.sequence(u)[-config.data.max_len:],
                               (config.data.max_len, 0))[-config.data.max_len:] for u in users])
  tokens, mask = examples.build_prompt_batch(cat.serializer, histories,
                                             c.max_tokens - c.max_item_tokens)
  params = state.params
  run = lambda: jax.block_until_ready(generate.sample(  # noqa: E731
      exp.model, params, tokens, mask, jax.random.key(0), num_samples=c.num_samples,
      max_new_tokens=c.max_new_tokens, temperature=float(c.sample_temperature), eos_id=None,
      pad_id=exp.tokenizer.pad_id))
  t = time.perf_counter()
  run()
  gen_first_s = time.perf_counter() - t
  gen_s, _ = _median_time(run, 3)
  rows = len(users) * c.num_samples
  gen_flops = generate.generation_flops(dcfg, rows, tokens.shape[1], c.max_new_tokens)
  return {
      "dataset": exp.summary,
      "decoder": {k: getattr(dcfg, k) for k in ("d_model", "n_layers", "n_heads", "n_kv_heads",
                                                 "head_dim", "mlp_dim", "vocab_size", "dtype")},
      "n_params": exp.n_params,
      "batch_size": b, "max_tokens": c.max_tokens, "max_item_tokens": c.max_item_tokens,
      "devices": exp.partitioner.mesh.size,
      **steps,
      "train_tokens_per_second": (joint_tokens + item_tokens) / step_s,
      "model_flops_per_train_step": flops_step,
      "xla_flops_per_train_step": xla_flops,
      "achieved_model_flops_per_second": flops_step / step_s,
      "generation_rows": rows, "generation_prompt_len": int(tokens.shape[1]),
      "generation_new_tokens": c.max_new_tokens,
      "generation_first_call_seconds_incl_compile": gen_first_s,
      "generation_seconds_median": gen_s,
      "generated_tokens_per_second": rows * c.max_new_tokens / gen_s,
      "generation_model_flops_per_second": gen_flops / gen_s,
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
  }


def benchmark_peer(python: str, dataset: str, epochs: int, out_dir: str) -> dict:
  """Runs the RecBole runner's timing mode in its own venv and returns its JSON."""
  runner = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", "peers", "recbole_sasrec.py")
  out = os.path.join(out_dir, f"peer_{dataset}_timing.json")
  cmd = [python, runner, "--dataset", dataset, "--mode", "timing", "--timing_epochs",
         str(epochs), "--threads", "2", "--out", out]
  logging.info("peer: %s", " ".join(cmd))
  subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
  with open(out) as f:
    return json.load(f)


def benchmark_sracl_reference(python: str, batches: int, threads: int, out_dir: str) -> dict:
  """Runs the reference SRA-CL timing harness in the peer venv; returns its JSON report."""
  out = os.path.join(out_dir, "peer_sracl_reference_timing.json")
  script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "peers", "sracl_reference.py")
  cmd = [python, script, "--threads", str(threads), "--batches", str(batches), "--out", out]
  logging.info("reference SRA-CL: %s", " ".join(cmd))
  subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
  with open(out) as f:
    return json.load(f)


def main(argv):
  del argv
  config = _CONFIG.value
  peak = matmul_peak_flops(_PEAK_N.value, dtype=_PEAK_DTYPE.value)
  ours = benchmark_calrec(config) if config.task.name == "calrec" else benchmark_ours(config)
  ours["matmul_peak_flops_per_second"] = peak
  ours["matmul_peak_shape_dtype"] = f"{_PEAK_N.value}^3 {_PEAK_DTYPE.value}"
  ours["fraction_of_matmul_peak"] = ours["achieved_model_flops_per_second"] / peak
  report = {
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
      "jax": jax.__version__, "backend": jax.default_backend(),
      "ours": ours,
  }
  if _PEER_PYTHON.value:
    peer = benchmark_peer(_PEER_PYTHON.value, _PEER_DATASET.value, _PEER_EPOCHS.value,
                          os.path.dirname(os.path.abspath(_OUT.value or "bench.json")))
    report["peer"] = {k: peer.get(k) for k in (
        "peer", "torch", "threads", "anomaly_detection", "seconds_per_epoch",
        "train_sequences_per_s", "eval_users_per_s", "epoch_seconds")}
    report["ratios"] = {
        "train_throughput_vs_peer": ours["train_sequences_per_second"] /
                                    peer["train_sequences_per_s"],
        "eval_throughput_vs_peer": ours["eval_users_per_second"] / peer["eval_users_per_s"],
    }
  if _SRACL_PEER_PYTHON.value:
    if config.task.name != "sracl":
      raise app.UsageError(f"--sracl_peer_python needs an SRA-CL config, got task "
                           f"{config.task.name!r}")
    ref = benchmark_sracl_reference(_SRACL_PEER_PYTHON.value, _SRACL_PEER_BATCHES.value,
                                    _PEER_THREADS.value,
                                    os.path.dirname(os.path.abspath(_OUT.value or "bench.json")))
    report["sracl_reference"] = {k: ref.get(k) for k in (
        "reference_commit", "threads", "torch", "batch_size", "timed_batches",
        "seconds_per_batch_median", "train_samples_per_s", "train_samples_per_epoch",
        "implied_seconds_per_epoch", "encoder_sequences_per_sample")}
    report.setdefault("ratios", {})["train_throughput_vs_sracl_reference"] = (
        ours["train_sequences_per_second"] / ref["train_samples_per_s"])
  text = json.dumps(report, indent=2)
  print(text)
  if _OUT.value:  # written whole and renamed: a killed run leaves no file that looks finished
    tmp = f"{_OUT.value}.tmp"
    with open(tmp, "w") as f:
      f.write(text + "\n")
    os.replace(tmp, _OUT.value)


if __name__ == "__main__":
  app.run(main)
