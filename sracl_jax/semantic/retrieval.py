"""Top-k semantic neighbours by cosine (or dot-product) similarity of frozen embeddings.

SRA-CL retrieves, for every training prefix, its k nearest *other* prefixes, and for every item its
k nearest other items.  `nearest_neighbours` does the search; `cached_neighbours` wraps it with an
on-disk cache keyed by the content of the embeddings, so a rerun loads instead of searching.

Two back ends:
  exact   blocked numpy matmul + argpartition, O(block x n) memory; used below `brute_force_below`
          database rows (catalogues of a few thousand items).
  scann   ScaNN (`scann.scann_ops_pybind`, no TensorFlow): k-means tree with ~sqrt(n) leaves,
          anisotropic asymmetric hashing, exact float32 reordering of the best `reorder`
          candidates.  Its recall@k against exact search on a random sample of queries is
          measured, logged and returned.

`nearest_neighbours` returns a 3-tuple `(indices [Q, k] int32, scores [Q, k] float32, stats)`:
rows are sorted by descending score, `scores` are cosine similarities (or dot products), and
`stats` is a JSON-serialisable dict (method, sizes, timings, `recall_at_k`, ...).

Pitfalls handled here:
  * ScaNN pads a row whose searched leaves hold fewer than k points with index 0 and NaN
    distances; such rows are recomputed exactly (`stats["fallback_rows"]`).
  * ScaNN's k-means tree with its own default, random centre initialisation, is not
    bit-reproducible between builds (even with a fixed `clustering_seed`): two builds of one
    131k-prefix table differed in 27% of rows.  Its k-means++ initialisation is deterministic
    (the same neighbours on every build, with any number of training threads), so that is our
    default (`scann_init="kmeans++"`); `scann_init="random"` is ScaNN's own default, the one every
    table built before this option used.  The exact path is deterministic too (ties broken by
    the lower index).
  * Self-exclusion drops the query's own index wherever it appears in the k+1 results (duplicate
    vectors tie with it and may rank first), else the last result.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import tqdm
from absl import logging

from seqrec_jax import ann

METRICS = ("cosine", "dot")
METHODS = ("auto", "exact", "scann")
SCANN_INITS = ann.TREE_INITS  # ScaNN tree centre initialisation (see the module doc)
_CACHE_VERSION = 1
# How exact search breaks ties at the k-th place (`ann.topk_rows`: the lowest indices, since
# session 14; `np.argpartition`'s arbitrary pick before).  It enters exact entries' cache key, so
# an entry written under an earlier rule is a miss and is searched again, never loaded.
_EXACT_TIE_RULE = "lowest_index"
_CHECK_ROWS = 65536  # rows per block when checking finiteness / normalising

# Keyword arguments of `nearest_neighbours` that `cached_neighbours` accepts; those that change the
# result enter the cache key (after resolution), the rest only change speed or verbosity.
_KEY_KWARGS = ("exclude_self", "metric", "method", "brute_force_below", "num_leaves",
               "num_leaves_to_search", "reorder", "scann_init", "recall_sample", "seed")
_OTHER_KWARGS = ("batch_size", "block_bytes", "progress", "searcher_dir")


def _scann_version() -> str:
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return metadata.version("scann")
  except Exception:  # pylint: disable=broad-except
    return "unknown"


# ---------------------------------------------------------------------------------------------
# Input checks and preparation.


def _as_matrix(x: Any, name: str) -> np.ndarray:
  """Float32, C-contiguous, 2-D, non-empty and finite, or a ValueError naming `name`."""
  arr = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
  if arr.ndim != 2:
    raise ValueError(f"{name} must be a 2-D [rows, dim] array, got shape {arr.shape}")
  if arr.shape[0] == 0 or arr.shape[1] == 0:
    raise ValueError(f"{name} is empty (shape {arr.shape})")
  for start in range(0, arr.shape[0], _CHECK_ROWS):
    block = arr[start:start + _CHECK_ROWS]
    if not np.isfinite(block).all():
      bad = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
      raise ValueError(f"{name} has non-finite values (NaN or inf), first in row {bad}")
  return arr


SCANN_MIN_ROWS = 64  # below this ScaNN cannot train its hashing; and exact search is instant

def _check_args(q: np.ndarray, db: np.ndarray, k: int, exclude_self: bool, metric: str,
                method: str, scann_init: str = ann.DEFAULT_TREE_INIT) -> None:
  if q.shape[1] != db.shape[1]:
    raise ValueError(f"dimension mismatch: queries have dim {q.shape[1]}, "
                     f"database has dim {db.shape[1]}")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be a positive integer, got {k!r}")
  n = db.shape[0]
  if k >= n:
    raise ValueError(f"k={k} must be smaller than the number of database rows ({n})")
  if exclude_self and q.shape[0] != n:
    raise ValueError("exclude_self=True needs queries[i] to be database row i, but there are "
                     f"{q.shape[0]} queries and {n} database rows")
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if scann_init not in SCANN_INITS:
    raise ValueError(f"scann_init must be one of {SCANN_INITS}, got {scann_init!r}")
  if method == "scann" and n < SCANN_MIN_ROWS:
    raise ValueError(f"method='scann' needs at least {SCANN_MIN_ROWS} database rows (its "
                     f"asymmetric hashing trains 16 centres per block), got {n}: use 'exact' "
                     "or 'auto' (exact below brute_force_below rows)")


def _normalised(x: np.ndarray, name: str) -> np.ndarray:
  """A row-L2-normalised float32 copy; all-zero rows stay zero (with a warning)."""
  out = np.empty_like(x)
  zero = 0
  for start in range(0, x.shape[0], _CHECK_ROWS):
    block = x[start:start + _CHECK_ROWS]
    norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
    zero += int((norms == 0).sum())
    out[start:start + _CHECK_ROWS] = block / np.where(norms == 0, 1.0, norms)[:, None]
  if zero:
    logging.warning("%s: %d all-zero rows; their cosine similarity is 0 to everything", name, zero)
  return out


def _prepare(queries: Any, database: Any, k: int, exclude_self: bool, metric: str, method: str,
             scann_init: str = ann.DEFAULT_TREE_INIT) -> Tuple[np.ndarray, np.ndarray]:
  """Validated float32 (queries, database); the same array twice when `queries is database`."""
  same = queries is database
  q = _as_matrix(queries, "queries")
  db = q if same else _as_matrix(database, "database")
  _check_args(q, db, k, exclude_self, metric, method, scann_init)
  return q, db


def _resolve(n: int, k: int, exclude_self: bool, method: str, brute_force_below: int,
             num_leaves: Optional[int], num_leaves_to_search: Optional[int],
             reorder: Optional[int], scann_init: str = ann.DEFAULT_TREE_INIT) -> Dict[str, Any]:
  """The concrete back end and its parameters for a database of n rows."""
  if method == "auto":
    method = "exact" if n < brute_force_below else "scann"
  out: Dict[str, Any] = {"method": method}
  if method == "scann":
    k_search = k + int(exclude_self)
    leaves = int(num_leaves) if num_leaves else max(1, int(round(math.sqrt(n))))
    leaves = max(1, min(leaves, n))
    to_search = (int(num_leaves_to_search) if num_leaves_to_search
                 else max(1, int(round(leaves / 10))))
    out.update(num_leaves=leaves, num_leaves_to_search=max(1, min(to_search, leaves)),
               reorder=max(int(reorder) if reorder else 10 * k_search, k_search),
               init=scann_init)
  return out


# ---------------------------------------------------------------------------------------------
# Search back ends.


def _batches(total: int, size: int, progress: bool, desc: str) -> Iterator[Tuple[int, int]]:
  """(start, stop) row ranges with a tqdm bar over rows when there is more than one batch."""
  bar = tqdm.tqdm(total=total, desc=desc, unit="query", disable=not progress or total <= size,
                  leave=False)
  try:
    for start in range(0, total, size):
      stop = min(start + size, total)
      yield start, stop
      bar.update(stop - start)
  finally:
    bar.close()


def _exact_search(q: np.ndarray, db: np.ndarray, k: int, *, block_bytes: int, progress: bool,
                  desc: str = "exact kNN") -> Tuple[np.ndarray, np.ndarray]:
  """Exact top-k by dot product, sorted by (score desc, index asc); O(block x n) memory."""
  n = db.shape[0]
  # Per query row: the [n] float32 scores plus argpartition's [n] int64 output.
  rows = int(max(1, min(q.shape[0], block_bytes // (12 * n))))
  indices = np.empty((q.shape[0], k), np.int32)
  scores = np.empty((q.shape[0], k), np.float32)
  for start, stop in _batches(q.shape[0], rows, progress, desc):
    indices[start:stop], scores[start:stop] = ann.topk_rows(q[start:stop] @ db.T, k)
  return indices, scores


def _build_scann(db: np.ndarray, k_search: int, params: Dict[str, Any],
                 searcher_dir: Optional[str]):
  """Builds (or loads from `searcher_dir`) a tree + AH + reorder ScaNN searcher."""
  scann = ann.import_scann()
  assets = os.path.join(searcher_dir, "scann_assets.pbtxt") if searcher_dir else None
  if assets and os.path.exists(assets):
    logging.info("loading the ScaNN searcher from %s", searcher_dir)
    return scann.scann_ops_pybind.load_searcher(searcher_dir), True
  searcher = ann.tree_ah_searcher(
      db, k_search, num_leaves=params["num_leaves"],
      num_leaves_to_search=params["num_leaves_to_search"],
      training_sample_size=max(100_000, 64 * params["num_leaves"]), reorder=params["reorder"],
      init=params["init"])
  if searcher_dir:
    parent = os.path.dirname(os.path.abspath(searcher_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(searcher_dir)}-{uuid.uuid4().hex}")
    os.makedirs(tmp)  # ScaNN's serialize() needs an existing directory
    try:
      searcher.serialize(tmp, relative_path=True)  # relative asset paths survive the rename
      os.rename(tmp, searcher_dir)
      logging.info("saved the ScaNN searcher to %s", searcher_dir)
    except OSError:  # another process saved it first
      logging.info("ScaNN searcher %s was saved concurrently; keeping that copy", searcher_dir)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return searcher, False


def _scann_search(searcher, q: np.ndarray, db: np.ndarray, k: int, *, batch_size: int,
                  block_bytes: int, progress: bool) -> Tuple[np.ndarray, np.ndarray, int]:
  """Approximate top-k; rows ScaNN could not fill (NaN padding) are recomputed exactly."""
  indices = np.empty((q.shape[0], k), np.int32)
  scores = np.empty((q.shape[0], k), np.float32)
  for start, stop in _batches(q.shape[0], batch_size, progress, "ScaNN kNN"):
    idx, dist = searcher.search_batched_parallel(q[start:stop], final_num_neighbors=k)
    indices[start:stop] = np.asarray(idx, np.int64).astype(np.int32)
    scores[start:stop] = dist
  short = np.flatnonzero(np.isnan(scores).any(axis=1))
  if short.size:
    logging.info("ScaNN returned fewer than %d neighbours for %d queries; searching them exactly",
                 k, short.size)
    indices[short], scores[short] = _exact_search(q[short], db, k, block_bytes=block_bytes,
                                                  progress=False)
  return indices, scores, int(short.size)


def _drop_self(indices: np.ndarray, scores: np.ndarray,
               self_ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """[Q, k+1] -> [Q, k]: removes each row's own id wherever it is, else the last column."""
  hit = indices == self_ids[:, None]
  hit &= np.cumsum(hit, axis=1) == 1  # first occurrence only
  hit[~hit.any(axis=1), -1] = True
  keep = ~hit
  shape = (indices.shape[0], indices.shape[1] - 1)
  return indices[keep].reshape(shape), scores[keep].reshape(shape)


def _recall(approx: np.ndarray, exact: np.ndarray) -> float:
  """Mean fraction of each exact top-k row found in the approximate row."""
  found = (approx[:, :, None] == exact[:, None, :]).any(axis=2)
  return float(found.mean())


# ---------------------------------------------------------------------------------------------
# Public API.


def nearest_neighbours(queries: Any, database: Any, k: int, *, exclude_self: bool = False,
                       metric: str = "cosine", method: str = "auto",
                       brute_force_below: int = 20000, num_leaves: Optional[int] = None,
                       num_leaves_to_search: Optional[int] = None, reorder: Optional[int] = None,
                       scann_init: str = ann.DEFAULT_TREE_INIT, recall_sample: int = 1000,
                       seed: int = 0, batch_size: int = 8192,
                       block_bytes: int = 256 << 20, progress: bool = True,
                       searcher_dir: Optional[str] = None
                       ) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
  """Top-k most similar database rows for every query row.

  Args:
    queries: [Q, d] embeddings (numpy or anything `np.asarray` takes); converted to float32.
    database: [n, d] embeddings.  Pass the same object as `queries` for self-retrieval to avoid
      a second copy.
    k: neighbours per query; 1 <= k < n.
    exclude_self: queries[i] is database row i (item-item, prefix-prefix): row i's own index is
      removed from its neighbours (k+1 are retrieved and the own index is dropped wherever it
      appears, or the last one if it does not appear).
    metric: "cosine" (rows L2-normalised, then dot product) or "dot".
    method: "exact" (blocked numpy brute force), "scann" (tree + asymmetric hashing + exact
      reordering), or "auto": exact when n < `brute_force_below`, ScaNN otherwise.
    brute_force_below: the database size from which "auto" uses ScaNN.
    num_leaves: ScaNN tree leaves; default round(sqrt(n)).
    num_leaves_to_search: leaves searched per query; default round(num_leaves / 10).
    reorder: candidates rescored exactly; default 10 * (k + exclude_self).
    scann_init: ScaNN tree centre initialisation: "kmeans++" (deterministic: every build gives
      the same neighbours) or "random" (ScaNN's own default; builds differ).
    recall_sample: queries sampled to measure the ScaNN recall@k against exact search (0: skip).
    seed: seed of that sample.
    batch_size: queries per ScaNN `search_batched_parallel` call (one progress-bar step).
    block_bytes: memory budget of one exact-search block (~12 * rows * n bytes).
    progress: show a tqdm bar over query batches.
    searcher_dir: ScaNN only: load the searcher from this directory when it holds one, else build
      it and save it there.  The caller keys the directory by the database and ScaNN parameters
      (`cached_neighbours(..., reuse_searcher=True)` does).

  Returns:
    (indices, scores, stats): indices [Q, k] int32 database rows, best first; scores [Q, k]
    float32 similarities (cosine or dot); stats, a JSON-serialisable dict with "method",
    "num_queries", "num_database", "dim", "k", "metric", "exclude_self", "recall_at_k" (1.0 for
    exact, the sampled estimate for ScaNN, None when not measured), "recall_queries", timings in
    seconds, and for ScaNN its parameters and "fallback_rows".

  Raises:
    ValueError: empty or non-2-D inputs, dimension mismatch, non-finite values, k >= n, an
      unknown metric or method, or exclude_self with Q != n.
  """
  q, db = _prepare(queries, database, k, exclude_self, metric, method, scann_init)
  return _search(q, db, int(k), exclude_self=exclude_self, metric=metric, method=method,
                 brute_force_below=brute_force_below, num_leaves=num_leaves,
                 num_leaves_to_search=num_leaves_to_search, reorder=reorder,
                 scann_init=scann_init,
                 recall_sample=recall_sample, seed=seed, batch_size=batch_size,
                 block_bytes=block_bytes, progress=progress, searcher_dir=searcher_dir)


def _search(q: np.ndarray, db: np.ndarray, k: int, *, exclude_self: bool, metric: str,
            method: str, brute_force_below: int, num_leaves: Optional[int],
            num_leaves_to_search: Optional[int], reorder: Optional[int], scann_init: str,
            recall_sample: int,
            seed: int, batch_size: int, block_bytes: int, progress: bool,
            searcher_dir: Optional[str]) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
  """`nearest_neighbours` on validated float32 arrays."""
  t0 = time.perf_counter()
  if metric == "cosine":
    same = q is db
    q = _normalised(q, "queries")
    db = q if same else _normalised(db, "database")
  n, num_q = db.shape[0], q.shape[0]
  k_search = k + int(exclude_self)
  params = _resolve(n, k, exclude_self, method, brute_force_below, num_leaves,
                    num_leaves_to_search, reorder, scann_init)
  stats: Dict[str, Any] = dict(params, num_queries=num_q, num_database=n, dim=int(db.shape[1]),
                               k=k, metric=metric, exclude_self=bool(exclude_self))
  self_ids = np.arange(num_q)

  if params["method"] == "exact":
    t1 = time.perf_counter()
    indices, scores = _exact_search(q, db, k_search, block_bytes=block_bytes, progress=progress)
    if exclude_self:
      indices, scores = _drop_self(indices, scores, self_ids)
    stats.update(recall_at_k=1.0, recall_queries=0, search_seconds=time.perf_counter() - t1)
  else:
    t1 = time.perf_counter()
    searcher, loaded = _build_scann(db, k_search, params, searcher_dir)
    t2 = time.perf_counter()
    indices, scores, fallback = _scann_search(searcher, q, db, k_search, batch_size=batch_size,
                                              block_bytes=block_bytes, progress=progress)
    del searcher
    if exclude_self:
      indices, scores = _drop_self(indices, scores, self_ids)
    t3 = time.perf_counter()
    stats.update(build_seconds=t2 - t1, searcher_loaded=loaded, search_seconds=t3 - t2,
                 fallback_rows=fallback, scann_version=_scann_version(),
                 recall_at_k=None, recall_queries=0)
    if recall_sample > 0:
      m = min(int(recall_sample), num_q)
      sample = np.sort(np.random.default_rng(seed).choice(num_q, size=m, replace=False))
      ex_idx, ex_scores = _exact_search(q[sample], db, k_search, block_bytes=block_bytes,
                                        progress=False)
      if exclude_self:
        ex_idx, _ = _drop_self(ex_idx, ex_scores, sample)
      stats.update(recall_at_k=_recall(indices[sample], ex_idx), recall_queries=m,
                   recall_seconds=time.perf_counter() - t3)
      level = logging.WARNING if stats["recall_at_k"] < 0.9 else logging.INFO
      logging.log(level, "ScaNN recall@%d = %.4f on %d sampled queries (num_leaves=%d, "
                  "num_leaves_to_search=%d, reorder=%d)%s", k, stats["recall_at_k"], m,
                  params["num_leaves"], params["num_leaves_to_search"], params["reorder"],
                  "; raise num_leaves_to_search for more" if stats["recall_at_k"] < 0.9 else "")
  stats["total_seconds"] = time.perf_counter() - t0
  logging.info("%s %d-NN of %d queries in %d x %d (%s%s): %.2fs", params["method"], k, num_q, n,
               db.shape[1], metric, ", self excluded" if exclude_self else "",
               stats["total_seconds"])
  return indices, scores, stats


def _digest(*parts: Any) -> str:
  """blake2b over arrays (shape, dtype and bytes) and JSON-able values."""
  h = hashlib.blake2b(digest_size=20)
  for part in parts:
    if isinstance(part, np.ndarray):
      h.update(f"array{part.shape}{part.dtype.str}".encode())
      flat = part.reshape(-1).view(np.uint8)
      for start in range(0, flat.size, 1 << 28):
        h.update(flat[start:start + (1 << 28)])
    else:
      h.update(json.dumps(part, sort_keys=True).encode())
  return h.hexdigest()


def cached_neighbours(cache_dir: str, queries: Any, database: Any, k: int, *,
                      reuse_searcher: bool = False,
                      **kw: Any) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
  """`nearest_neighbours` with an on-disk cache keyed by the embeddings and the parameters.

  The key hashes the float32 bytes and shapes of `queries` and `database`, k, and the resolved
  parameters that change the result (exclude_self, metric, back end; for ScaNN num_leaves,
  num_leaves_to_search, reorder, init, recall_sample, seed; for exact search its tie rule).  An
  entry is a directory `<cache_dir>/nn-<key>/` with `indices.npy`, `scores.npy` and
  `stats.json`, written to a temporary directory and renamed, so a killed run never leaves a
  partial entry.

  Args:
    cache_dir: directory of the cache (created if missing).
    queries: as for `nearest_neighbours`.
    database: as for `nearest_neighbours`.
    k: as for `nearest_neighbours`.
    reuse_searcher: ScaNN only: also save the built searcher under
      `<cache_dir>/scann-<key of database and ScaNN parameters>/` and load it next time (useful
      when the queries change but the database does not).
    **kw: keyword arguments of `nearest_neighbours`.

  Returns:
    (indices, scores, stats) as `nearest_neighbours`; stats also has "cache" ("hit" or "miss")
    and "cache_path".
  """
  unknown = sorted(set(kw) - set(_KEY_KWARGS) - set(_OTHER_KWARGS) - {"searcher_dir"})
  if unknown:
    raise TypeError(f"cached_neighbours got unexpected keyword arguments {unknown}")
  defaults = dict(exclude_self=False, metric="cosine", method="auto", brute_force_below=20000,
                  num_leaves=None, num_leaves_to_search=None, reorder=None,
                  scann_init=ann.DEFAULT_TREE_INIT, recall_sample=1000, seed=0)
  opts = dict(defaults, **{key: kw[key] for key in _KEY_KWARGS if key in kw})
  q, db = _prepare(queries, database, k, opts["exclude_self"], opts["metric"], opts["method"],
                   opts["scann_init"])
  k = int(k)
  resolved = _resolve(db.shape[0], k, opts["exclude_self"], opts["method"],
                      opts["brute_force_below"], opts["num_leaves"], opts["num_leaves_to_search"],
                      opts["reorder"], opts["scann_init"])
  key_params = dict(resolved, version=_CACHE_VERSION, k=k, exclude_self=bool(opts["exclude_self"]),
                    metric=opts["metric"])
  if resolved["method"] == "scann":
    key_params.update(recall_sample=int(opts["recall_sample"]), seed=int(opts["seed"]))
  else:
    key_params.update(ties=_EXACT_TIE_RULE)
  db_digest = _digest(db)
  q_digest = db_digest if q is db else _digest(q)
  key = _digest(q_digest, db_digest, key_params)
  path = os.path.join(cache_dir, f"nn-{key}")

  files = [os.path.join(path, name) for name in ("indices.npy", "scores.npy", "stats.json")]
  if all(os.path.exists(f) for f in files):
    try:
      indices, scores = np.load(files[0]), np.load(files[1])
      with open(files[2]) as f:
        stats = json.load(f)
      if indices.shape == scores.shape == (q.shape[0], k):
        logging.info("kNN cache hit: loaded %s (no search)", path)
        stats.update(cache="hit", cache_path=path)
        return indices, scores, stats
      logging.warning("kNN cache entry %s has shape %s, expected %s; recomputing", path,
                      indices.shape, (q.shape[0], k))
    except (OSError, ValueError) as e:
      logging.warning("kNN cache entry %s unreadable (%s); recomputing", path, e)
    shutil.rmtree(path, ignore_errors=True)

  logging.info("kNN cache miss: computing %s", path)
  run_kw = dict(kw)
  if reuse_searcher and resolved["method"] == "scann" and "searcher_dir" not in kw:
    searcher_key = _digest(db_digest, dict(
        num_leaves=resolved["num_leaves"], num_leaves_to_search=resolved["num_leaves_to_search"],
        reorder=resolved["reorder"], init=resolved["init"], metric=opts["metric"],
        version=_CACHE_VERSION,
        scann=_scann_version()))
    run_kw["searcher_dir"] = os.path.join(cache_dir, f"scann-{searcher_key}")
  run_kw.update(opts)
  indices, scores, stats = _search(q, db, k, **dict(
      dict(batch_size=8192, block_bytes=256 << 20, progress=True, searcher_dir=None), **run_kw))

  os.makedirs(cache_dir, exist_ok=True)
  tmp = os.path.join(cache_dir, f".tmp-nn-{key}-{uuid.uuid4().hex}")
  os.makedirs(tmp)
  try:
    np.save(os.path.join(tmp, "indices.npy"), indices)
    np.save(os.path.join(tmp, "scores.npy"), scores)
    with open(os.path.join(tmp, "stats.json"), "w") as f:
      json.dump(dict(stats, key_params=key_params), f, indent=1, sort_keys=True)
    os.rename(tmp, path)
    logging.info("kNN cache: saved %s", path)
  except OSError:
    if not os.path.exists(files[2]):
      raise
    logging.info("kNN cache: %s was written concurrently; keeping that copy", path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  stats.update(cache="miss", cache_path=path, key_params=key_params)
  return indices, scores, stats
