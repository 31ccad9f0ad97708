"""Speed of batch top-K recommendation (users/s) next to a naive per-user loop, in one run.

  JAX_PLATFORMS=cpu python launch/recommend_benchmark.py [--out bench_recommend.json] \
      [--peer_python /work/peers-venv/bin/python]

Two catalogues, both with a randomly initialised SASRec (speed does not depend on training):
  * Beauty (configs/sasrec/beauty.py: ../shared/data/beauty/Beauty.txt, 12,101 items, d=64),
    every user's top-K;
  * a synthetic catalogue of --synthetic_items items (default 1M, d=64) with random histories.

For each: the batched path (`Recommender.topk_dense`: sharded encoder + scores + `lax.top_k`
inside jit, [G, K] to the host) and `Recommender.write_topk` (the same plus JSONL formatting and
the file), both after a warm-up that compiles; then the naive baseline, measured in the same run:
one user at a time, a jitted encoder + scores call, the whole score vector to the host and a numpy
argsort.  Users/s figures are medians of --repeats timed passes; the naive loop times
--naive_users users (it is slow by construction).

With --peer_python (a Python with RecBole 1.2.1, benchmarks/peers/README.md), after our
measurements (so the two never share the cores) benchmarks/peers/recbole_full_sort.py times the
per-user loop a RecBole user writes (`full_sort_predict` + `torch.topk` per user) on RecBole's
SASRec of the same sizes, max_len, K and catalogues with --peer_threads torch threads; each
catalogue row gains `peer_users_per_s` and `ratio_vs_recbole` (batched top-K / peer), and
`ratio_jsonl_vs_recbole` (the JSONL path / peer).
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import numpy as np

from seqrec_jax import loop
from seqrec_jax import recommend
from seqrec_jax.data.dataset import SequenceDataset

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "sasrec", "beauty.py"), "Config of the real catalogue.")
_TOP_K = flags.DEFINE_integer("top_k", 100, "K.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Users per batch on the real catalogue.")
_SYNTH_ITEMS = flags.DEFINE_integer("synthetic_items", 1_000_000, "Synthetic catalogue size.")
_SYNTH_USERS = flags.DEFINE_integer("synthetic_users", 512, "Synthetic users timed (batched).")
_SYNTH_BATCH = flags.DEFINE_integer("synthetic_batch_size", 64,
                                    "Users per batch on the synthetic catalogue (scores G x n).")
_NAIVE_USERS = flags.DEFINE_integer("naive_users", 200, "Users timed in the naive loop (real).")
_NAIVE_SYNTH = flags.DEFINE_integer("naive_synthetic_users", 20,
                                    "Users timed in the naive loop (synthetic).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed passes of the batched paths (median).")
_OUT = flags.DEFINE_string("out", None, "Write the figures as JSON here.")
_PEER_PYTHON = flags.DEFINE_string("peer_python", None,
                                   "Python of the RecBole venv; runs the RecBole per-user loop.")
_PEER_THREADS = flags.DEFINE_integer("peer_threads", 2, "torch.set_num_threads of the peer.")
_PEER_USERS = flags.DEFINE_integer("peer_users", 500, "Users the peer times on the real catalogue.")
_PEER_SYNTH_USERS = flags.DEFINE_integer("peer_synthetic_users", 50,
                                         "Users the peer times on the synthetic catalogue.")

_PROFILE_BATCH = flags.DEFINE_integer(
    "profile_batch", 256, "Users per batch of the top-K profile over the synthetic catalogue "
    "(scores alone, + lax.top_k, + grouped_top_k); 0 = skip it.")

_PEER_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "benchmarks", "peers", "recbole_full_sort.py")


def _recommender(config, dataset, batch_size, seed=0):
  """A Recommender over `dataset` with a randomly initialised model (no workdir)."""
  return recommend.Recommender.from_config(config, dataset, seed=seed, batch_size=batch_size)


def _sequences(dataset, users):
  return [dataset.items[dataset.offsets[u]:dataset.offsets[u + 1]] for u in users]


def _naive(rec, users, k):
  """users/s of a per-user loop: jitted forward + scores for [1, L], argsort on the host."""
  length = rec.max_len
  fn = jax.jit(lambda p, x: recommend.scores_step(p, {"inputs": x}, model=rec.model))
  params = jax.device_get(rec.params)

  def one(u):
    seq = rec.dataset.items[rec.dataset.offsets[u]:rec.dataset.offsets[u + 1]][-length:]
    window = np.zeros((1, length), np.int32)
    window[0, length - len(seq):] = seq
    scores = np.asarray(fn(params, window))[0]  # [V] to the host
    top = np.argsort(-scores, kind="stable")[:k]
    return [rec.item_ids[i] for i in top], scores[top].tolist()

  one(users[0])  # compile
  t = time.perf_counter()
  for u in users:
    one(u)
  return len(users) / (time.perf_counter() - t)


def _batched(rec, users, k, repeats):
  """users/s of `topk_dense` (device + [G, K] fetch) and of `write_topk` (+ JSONL), medians."""
  seqs = _sequences(rec.dataset, users)
  rec.topk_dense(seqs[:rec.batch_size], k, exclude_seen=False)  # compile the full-batch shape
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    rec.topk_dense(seqs, k, exclude_seen=False)
    times.append(time.perf_counter() - t)
  topk_speed = len(users) / float(np.median(times))
  ids = [str(u) for u in rec.user_ids[users]]
  with tempfile.TemporaryDirectory() as tmp:
    times = []
    for _ in range(repeats):
      stats = rec.write_topk(os.path.join(tmp, "recs.jsonl"), k, users=ids, overwrite=True,
                             progress=False)
      times.append(stats["seconds"])
    size = os.path.getsize(os.path.join(tmp, "recs.jsonl"))
  return topk_speed, len(users) / float(np.median(times)), size


def _synthetic_dataset(n_items, n_users, length, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(5, length + 10, n_users)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  items = rng.integers(1, n_items + 1, int(offsets[-1])).astype(np.int32)
  item_ids = np.empty(n_items + 1, dtype=object)
  item_ids[0] = "[PAD]"
  item_ids[1:] = [f"i{i}" for i in range(1, n_items + 1)]
  return SequenceDataset(name="synthetic", items=items, offsets=offsets,
                         user_ids=np.asarray([f"u{u}" for u in range(n_users)], dtype=object),
                         item_ids=item_ids)


def _report(name, n_items, dim, users, topk, written, naive, naive_users, size=None):
  row = {"catalogue": name, "items": n_items, "dim": dim, "users_timed": users,
         "batched_topk_users_per_s": topk, "batched_jsonl_users_per_s": written,
         "naive_users_per_s": naive, "naive_users_timed": naive_users,
         "speedup_topk": topk / naive, "speedup_jsonl": written / naive}
  if size is not None:
    row["jsonl_bytes"] = size
  print(f"{name:10s} items={n_items:>9,d} d={dim}: batched top-{_TOP_K.value} "
        f"{topk:9.0f} users/s, with JSONL {written:9.0f} users/s, naive per-user loop "
        f"{naive:7.1f} users/s -> x{topk / naive:.0f} (x{written / naive:.0f} with JSONL)")
  return row


def _peer(config, n_items, k):
  """Runs recbole_full_sort.py in the peer venv at our sizes and returns its JSON."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "peer_full_sort.json")
    cmd = [_PEER_PYTHON.value, _PEER_SCRIPT, "--out", out, "--threads", str(_PEER_THREADS.value),
           "--top_k", str(k), "--max_len", str(config.data.max_len),
           "--synthetic_items", str(n_items), "--beauty_users", str(_PEER_USERS.value),
           "--synthetic_users", str(_PEER_SYNTH_USERS.value)]
    if config.data.name == "beauty":  # the same Beauty.txt as ours, not the peer's default path
      cmd += ["--beauty_path", config.data.path]
    logging.info("peer: %s", " ".join(cmd))
    # RecBole logs its whole config on stdout; the JSON carries what we need.
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
      return json.load(f)


def _add_peer(results, peer):
  """Puts the peer's users/s and our ratios to it on the catalogue rows of the same name."""
  results["peer"] = {key: peer[key] for key in ("peer", "torch", "threads", "max_len", "repeats",
                                                "anomaly_detection")}
  results["peer"]["method"] = ("per user: Interaction(item_id_list, item_length) -> "
                               "full_sort_predict -> scores[:, 0] = -inf -> torch.topk -> numpy; "
                               "random init, eval mode, no_grad; median of the timed passes")
  by_name = {row["catalogue"]: row for row in peer["runs"]}
  for row in results["runs"]:
    theirs = by_name.get(row["catalogue"])
    if theirs is None:  # the peer only builds Beauty and the synthetic catalogue
      continue
    if theirs["items"] != row["items"]:
      raise ValueError(f"peer catalogue {theirs['catalogue']} has {theirs['items']} items, "
                       f"ours {row['items']}")
    speed = theirs["users_per_s"]
    # The passes too: on a shared machine they show how much the peer's figure wandered.
    row.update(peer_users_per_s=speed, peer_users_timed=theirs["users_timed"],
               peer_pass_seconds=theirs["pass_seconds"],
               ratio_vs_recbole=row["batched_topk_users_per_s"] / speed,
               ratio_jsonl_vs_recbole=row["batched_jsonl_users_per_s"] / speed)
    print(f"{row['catalogue']:10s} RecBole per-user loop {speed:7.1f} users/s "
          f"({theirs['users_timed']} users, {peer['threads']} threads) -> ours "
          f"x{row['ratio_vs_recbole']:.1f} (x{row['ratio_jsonl_vs_recbole']:.1f} with JSONL)")


def _profile_topk(rec, n_items: int, dim: int, batch: int, k: int, repeats: int = 5) -> dict:
  """Median ms of the batched step's pieces: where the time goes at n_items.

  On random vectors (h [batch, dim], a [n_items, dim] table): the scores alone, with `lax.top_k`,
  with `grouped_top_k`; and on the recommender `rec`'s own model and parameters over a random
  batch of windows: `model.score` alone and the whole `recommend.topk_step`.
  """
  from seqrec_jax import large_catalog  # pylint: disable=g-import-not-at-top
  h = jax.random.normal(jax.random.key(0), (batch, dim))
  table = jax.random.normal(jax.random.key(1), (n_items, dim))
  model, params = rec.model, jax.device_get(rec.params)
  windows = jax.numpy.asarray(np.random.default_rng(0).integers(
      1, model.config.n_items + 1, (batch, rec.max_len)), jax.numpy.int32)
  pieces = {
      "scores": (jax.jit(lambda h, t: h @ t.T), (h, table)),
      "scores+lax.top_k": (jax.jit(lambda h, t: jax.lax.top_k(h @ t.T, k)), (h, table)),
      "scores+grouped_top_k": (jax.jit(lambda h, t: large_catalog.grouped_top_k(h @ t.T, k)),
                               (h, table)),
      "model.score": (jax.jit(lambda p, x: model.apply({"params": p}, x,
                                                       method=recommend._scores)),  # pylint: disable=protected-access
                      (params, windows)),
      "topk_step": (jax.jit(lambda p, x: recommend.topk_step(p, {"inputs": x}, model=model, k=k,
                                                             exclude_seen=False)),
                    (params, windows)),
  }
  out = {"n_items": n_items, "dim": dim, "batch": batch, "k": k, "ms_median": {},
         "users_per_second": {}}
  for name, (fn, args) in pieces.items():
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - t)
    med = float(np.median(times))
    out["ms_median"][name] = 1e3 * med
    out["users_per_second"][name] = batch / med
  return out


def main(argv):
  del argv
  k = _TOP_K.value
  results = {"device": str(jax.devices()[0]), "devices": jax.device_count(),
             "cpu_count": os.cpu_count(), "platform": platform.platform(), "top_k": k, "runs": []}

  config = _CONFIG.value
  dataset = loop.load_split(config).dataset
  rec = _recommender(config, dataset, _BATCH.value)
  users = np.arange(dataset.n_users)
  topk, written, size = _batched(rec, users, k, _REPEATS.value)
  naive_users = users[:_NAIVE_USERS.value]
  naive = _naive(rec, naive_users, k)
  results["runs"].append(_report(dataset.name, dataset.n_items, rec.dim, len(users), topk,
                                 written, naive, len(naive_users), size))

  synth_config = config.copy_and_resolve_references()
  with synth_config.unlocked():
    synth_config.model.hidden = 64
  synth = _synthetic_dataset(_SYNTH_ITEMS.value, _SYNTH_USERS.value, config.data.max_len)
  rec = _recommender(synth_config, synth, _SYNTH_BATCH.value)
  users = np.arange(synth.n_users)
  topk, written, size = _batched(rec, users, k, _REPEATS.value)
  naive_users = users[:_NAIVE_SYNTH.value]
  naive = _naive(rec, naive_users, k)
  results["runs"].append(_report("synthetic", synth.n_items, rec.dim, len(users), topk, written,
                                 naive, len(naive_users), size))
  if _PROFILE_BATCH.value > 0:
    # The models' table layout: n_items + 1 rows rounded up to a multiple of 64.
    rows = -(-(synth.n_items + 1) // 64) * 64
    results["profile"] = _profile_topk(rec, rows, rec.dim, _PROFILE_BATCH.value, k)
    logging.info("top-K profile: %s", json.dumps(results["profile"]))
  if _PEER_PYTHON.value:
    _add_peer(results, _peer(config, synth.n_items, k))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=2)
    logging.info("wrote %s", _OUT.value)


if __name__ == "__main__":
  app.run(main)
