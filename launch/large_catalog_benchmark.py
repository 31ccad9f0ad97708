"""Large-catalogue benchmark: SASRec training with each softmax, and sharded top-k evaluation, on
synthetic power-law data of any size (issue #5).

  python launch/large_catalog_benchmark.py --n_items=1000000 --n_users=200000 \\
      --n_interactions=10000000 --softmax=full,sharded,sampled --out=bench_1m.json

For every --softmax kind it builds the experiment (the same `loop.build_experiment` a training
run uses), compiles the train step, and times --steps steps after --warmup (host batching
included).  Two last runs time full-ranking top-k of --eval_users users (`sharded_top_k`: never
[B, V] scores) and the loop's own evaluation of them (HR/NDCG/MRR from blocked ranks,
`sharded_target_ranks`).  Reported per run: compile seconds, the compiled step's XLA temporary memory,
median step seconds, training examples/s, peak host RSS and, where the backend reports it, peak
device memory.

With --isolate (default) every run is its own subprocess, so peak RSS and device memory belong
to that run alone and an out-of-memory "full" softmax is recorded as an error instead of ending
the benchmark.  Each subprocess regenerates the data (same seed, same data).
"""

import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
import numpy as np

from seqrec_jax import data as data_lib
from seqrec_jax import large_catalog
from seqrec_jax import loop
from seqrec_jax.default_config import base_config

_N_ITEMS = flags.DEFINE_integer("n_items", 100_000, "Catalogue size.")
_N_USERS = flags.DEFINE_integer("n_users", 50_000, "Users.")
_N_INTERACTIONS = flags.DEFINE_integer("n_interactions", 1_000_000, "Interactions (>= 3 x users).")
_ALPHA = flags.DEFINE_float("alpha", 1.0, "Zipf exponent of item popularity.")
_SEED = flags.DEFINE_integer("seed", 0, "Data and init seed.")
_SOFTMAX = flags.DEFINE_list("softmax", ["full", "sharded", "sampled"],
                             "Softmax kinds to time (config.model.softmax).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Global train batch.")
_MAX_LEN = flags.DEFINE_integer("max_len", 50, "Input window.")
_HIDDEN = flags.DEFINE_integer("hidden", 64, "Model width (FFN 4x).")
_LAYERS = flags.DEFINE_integer("n_layers", 2, "Transformer blocks.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_NEGATIVES = flags.DEFINE_integer("num_negatives", 1024, "Sampled softmax: shared negatives.")
_POWER = flags.DEFINE_float("sampling_power", 0.75, "Sampled softmax: proposal exponent.")
_CHUNK = flags.DEFINE_integer("chunk_size", 65536, "Sharded softmax / top-k: rows per block.")
_MESH = flags.DEFINE_string("mesh", "data=1,fsdp=1,tensor=-1",
                            "Mesh shape, e.g. 'data=2,tensor=4'; -1 = the remaining devices.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_EVAL_USERS = flags.DEFINE_integer("eval_users", 4096, "Users ranked by the top-k run; 0 = skip.")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch_size", 256, "Users per top-k batch.")
_TOP_K = flags.DEFINE_integer("top_k", 100, "List length of the top-k run.")
_EVAL_REPEATS = flags.DEFINE_integer("eval_repeats", 3, "Timed top-k passes (median).")
_ISOLATE = flags.DEFINE_bool("isolate", True, "Each run in its own subprocess.")
_OUT = flags.DEFINE_string("out", None, "Write the report as JSON here.")
_RUN = flags.DEFINE_string("run", None, "Internal: the single run a subprocess performs.")

_ALL_FLAGS = (_N_ITEMS, _N_USERS, _N_INTERACTIONS, _ALPHA, _SEED, _SOFTMAX, _BATCH, _MAX_LEN,
              _HIDDEN, _LAYERS, _DTYPE, _NEGATIVES, _POWER, _CHUNK, _MESH, _STEPS, _WARMUP,
              _EVAL_USERS, _EVAL_BATCH, _TOP_K, _EVAL_REPEATS, _ISOLATE, _OUT, _RUN)
TOP_K_RUN = "top_k"
RANKS_RUN = "ranks"


def _rss_mib() -> float:
  """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _device_info() -> dict:
  """The devices and their peak memory where the backend reports it (GPU/TPU; None on CPU).

  Only runs call this: with --isolate the parent never starts a backend, which on a GPU would
  reserve memory its subprocesses need.
  """
  device = jax.devices()[0]
  peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
  return {"backend": jax.default_backend(), "devices": jax.device_count(),
          "device_kind": device.device_kind,
          "device_peak_mib": None if peak is None else peak / 2 ** 20}


def _mesh_shape(text: str) -> dict:
  shape = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, size = part.partition("=")
    shape[name.strip()] = int(size)
  return shape


def _config(softmax: str):
  c = base_config()
  c.seed = _SEED.value
  c.data.name = "synthetic"
  c.data.max_len = _MAX_LEN.value
  c.model.hidden = _HIDDEN.value
  c.model.inner = 4 * _HIDDEN.value
  c.model.n_layers = _LAYERS.value
  c.model.dtype = _DTYPE.value
  c.model.dropout = c.model.attn_dropout = 0.2
  c.model.softmax = softmax
  c.model.num_negatives = _NEGATIVES.value
  c.model.sampling_power = _POWER.value
  c.model.softmax_chunk = _CHUNK.value
  c.train.batch_size = _BATCH.value
  c.train.num_steps = _WARMUP.value + _STEPS.value + 1
  c.train.progress = False
  c.eval.batch_size = _EVAL_BATCH.value
  c.mesh.shape = _mesh_shape(_MESH.value)
  return c


def _data():
  """The synthetic split; returns (split, seconds, peak RSS MiB after it)."""
  t = time.perf_counter()
  dataset = large_catalog.synthetic_powerlaw(_N_USERS.value, _N_ITEMS.value,
                                             _N_INTERACTIONS.value, _ALPHA.value, _SEED.value)
  split = data_lib.leave_one_out(dataset)
  return split, time.perf_counter() - t, _rss_mib()


def run_train(softmax: str) -> dict:
  """Builds, compiles and times the train step with `softmax`."""
  split, data_s, data_rss = _data()
  t = time.perf_counter()
  exp = loop.build_experiment(_config(softmax), split=split)
  build_s = time.perf_counter() - t
  state, it = exp.state, exp.iterator
  batch = exp.train_step.device_batch(next(it))
  t = time.perf_counter()
  with exp.partitioner.context():
    compiled = exp.train_step.jitted.lower(state, batch, exp.consts).compile()
  compile_s = time.perf_counter() - t
  memory = compiled.memory_analysis()
  temp_mib = None if memory is None else memory.temp_size_in_bytes / 2 ** 20

  def step(state):
    # The compiled executable directly: no second compilation by the jit cache.
    return compiled(state, exp.train_step.device_batch(next(it)), exp.consts)

  for _ in range(_WARMUP.value):
    state, metrics = step(state)
  jax.block_until_ready(state)
  times, losses = [], []
  for _ in range(_STEPS.value):
    t = time.perf_counter()
    state, metrics = step(state)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
    losses.append(float(metrics["loss_sum"]) / max(float(metrics["weight_sum"]), 1.0))
  step_s = float(np.median(times))
  return {
      "softmax": softmax,
      "data_seconds": data_s,
      "rss_after_data_mib": data_rss,
      "build_seconds": build_s,
      "train_compile_seconds": compile_s,
      "xla_temp_mib": temp_mib,
      "step_seconds_median": step_s,
      "step_seconds_p10_p90": [float(np.percentile(times, 10)), float(np.percentile(times, 90))],
      "train_examples_per_second": _BATCH.value / step_s,
      "loss_first_last": [losses[0], losses[-1]],
      "n_params": exp.n_params,
      "peak_rss_mib": _rss_mib(),
      **_device_info(),
  }


def _timed_passes(one_pass):
  """(first pass's result, its seconds incl. compilation, median seconds of --eval_repeats more
  passes; the first pass's when there are none)."""
  t = time.perf_counter()
  result = one_pass()
  first_s = time.perf_counter() - t
  times = []
  for _ in range(_EVAL_REPEATS.value):
    t = time.perf_counter()
    one_pass()
    times.append(time.perf_counter() - t)
  return result, first_s, float(np.median(times)) if times else first_s


def run_top_k() -> dict:
  """Times full-ranking top-k of the first --eval_users evaluated users (test inputs)."""
  split, data_s, data_rss = _data()
  exp = loop.build_experiment(_config("full"), split=split)
  part, model = exp.partitioner, exp.model
  params = exp.task.backbone_params(exp.state.params)
  table = params["item_embedding"]["embedding"]
  n_items, k = model.config.n_items, _TOP_K.value
  users = split.eval_users[:_EVAL_USERS.value]
  sub = dataclasses.replace(split, eval_users=users)
  batches = [part.shard_inputs({key: b[key] for key in ("inputs", "targets", "weights")})
             for b in data_lib.eval_batches(sub, "test", _MAX_LEN.value, _EVAL_BATCH.value)]

  @jax.jit
  def rank(params, table, batch):
    hidden = model.apply({"params": params}, batch["inputs"], method=lambda m, x: m(x))  # [B, D]
    _, ids = large_catalog.sharded_top_k(hidden, table, k, n_items=n_items,
                                         chunk_size=_CHUNK.value)  # [B, k]
    hits = jax.numpy.any(ids == batch["targets"][:, None], axis=1)  # [B]
    return jax.numpy.sum(hits * batch["weights"])

  def one_pass():
    with part.context():
      return float(sum(rank(params, table, b) for b in batches))

  hits, first_s, eval_s = _timed_passes(one_pass)
  return {
      "data_seconds": data_s,
      "rss_after_data_mib": data_rss,
      "eval_users": int(len(users)),
      "k": k,
      "first_pass_seconds_incl_compile": first_s,
      "pass_seconds_median": eval_s,
      "eval_users_per_second": len(users) / eval_s,
      f"untrained_HR@{k}": hits / max(len(users), 1),
      "peak_rss_mib": _rss_mib(),
      **_device_info(),
  }


def run_ranks() -> dict:
  """Times the training loop's own evaluation (HR/NDCG/MRR of every target's full-ranking rank)
  over the first --eval_users users, with softmax="sharded" so that the ranks are counted block
  by block (`large_catalog.sharded_target_ranks`) rather than from [B, V] scores."""
  split, data_s, data_rss = _data()
  users = split.eval_users[:_EVAL_USERS.value]
  sub = dataclasses.replace(split, eval_users=users)
  exp = loop.build_experiment(_config("sharded"), split=sub)
  metrics, first_s, eval_s = _timed_passes(lambda: exp.evaluate(exp.state.params, "test"))
  return {
      "data_seconds": data_s,
      "rss_after_data_mib": data_rss,
      "eval_users": int(len(users)),
      "first_pass_seconds_incl_compile": first_s,
      "pass_seconds_median": eval_s,
      "eval_users_per_second": len(users) / eval_s,
      "untrained_metrics": {k: metrics[k] for k in ("HR@10", "NDCG@10", "HR@20")},
      "peak_rss_mib": _rss_mib(),
      **_device_info(),
  }


def _run(name: str) -> dict:
  if name == TOP_K_RUN:
    return run_top_k()
  return run_ranks() if name == RANKS_RUN else run_train(name)


def _run_isolated(name: str) -> dict:
  """Runs one benchmark in a fresh interpreter with the same flags; errors become records."""
  skip = {_RUN.name, _OUT.name, _ISOLATE.name}
  keep = [flags.FLAGS[h.name].serialize() for h in _ALL_FLAGS if h.name not in skip]
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "run.json")
    cmd = [sys.executable, os.path.abspath(__file__), *keep, f"--run={name}", f"--out={out}",
           "--noisolate"]
    logging.info("run %s: %s", name, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not os.path.exists(out):
      logging.warning("run %s failed (exit %d)", name, proc.returncode)
      return {"error": proc.stderr[-4000:], "returncode": proc.returncode}
    with open(out) as f:
      return json.load(f)


def main(argv):
  del argv
  if _RUN.value:  # a subprocess of --isolate: one run, its JSON to --out
    result = _run(_RUN.value)
    if _OUT.value:
      with open(_OUT.value, "w") as f:
        json.dump(result, f, indent=2)
    return
  unknown = sorted(set(_SOFTMAX.value) - set(large_catalog.SOFTMAX_KINDS))
  if unknown:
    raise app.UsageError(f"--softmax has unknown kinds {unknown}")
  names = list(_SOFTMAX.value) + ([TOP_K_RUN, RANKS_RUN] if _EVAL_USERS.value > 0 else [])
  results = {}
  for name in names:
    results[name] = _run_isolated(name) if _ISOLATE.value else _run(name)
    logging.info("%s: %s", name, json.dumps(results[name]))
  report = {
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
      "jax": jax.__version__,
      "mesh": _mesh_shape(_MESH.value),
      "data": {"n_users": _N_USERS.value, "n_items": _N_ITEMS.value,
               "n_interactions": _N_INTERACTIONS.value, "alpha": _ALPHA.value},
      "model": {"hidden": _HIDDEN.value, "n_layers": _LAYERS.value, "max_len": _MAX_LEN.value,
                "dtype": _DTYPE.value, "batch_size": _BATCH.value,
                "num_negatives": _NEGATIVES.value, "sampling_power": _POWER.value,
                "chunk_size": _CHUNK.value},
      "isolated": _ISOLATE.value,
      "runs": {k: v for k, v in results.items() if k not in (TOP_K_RUN, RANKS_RUN)},
      "top_k": results.get(TOP_K_RUN),
      "ranks": results.get(RANKS_RUN),
  }
  text = json.dumps(report, indent=2)
  print(text)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text)


if __name__ == "__main__":
  app.run(main)
