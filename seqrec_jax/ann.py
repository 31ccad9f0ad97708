"""Nearest-neighbour search shared by the semantic retrieval stage and the serving export.

Two things live here so that `sracl_jax.semantic.retrieval` (prefix and item neighbours) and
`seqrec_jax.recommend` (the exported item index) cannot drift apart:

- `tree_ah_searcher`: ScaNN's tree + asymmetric hashing + exact reorder, dot product.
- `topk_rows`: the exact top-k of a block of scores in one canonical order, score descending
  and, on ties, the lower index first. Both exact searches call it.

Tree initialisation. ScaNN trains its k-means tree from random centres by default, and that draw
is not seeded: two builds from the same vectors differ (31% of the Toys prefix rows did, see
BENCHMARKS.md §6). Its k-means++ initialisation is deterministic, so `"kmeans++"` is our default;
`"random"` is ScaNN's own, kept for tables and indexes built before.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

TREE_INITS = ("kmeans++", "random")
DEFAULT_TREE_INIT = "kmeans++"


def import_scann():
  """The `scann` module, or an ImportError that says how to install it."""
  try:
    import scann  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the ScaNN back end needs the `scann` package (pip install scann==1.4.2; "
                      "TensorFlow is not required)") from e
  return scann


def check_tree_init(init: str) -> str:
  if init not in TREE_INITS:
    raise ValueError(f"ScaNN tree init must be one of {TREE_INITS}, got {init!r}")
  return init


def tree_ah_searcher(db: np.ndarray, k: int, *, num_leaves: int, num_leaves_to_search: int,
                     training_sample_size: int, reorder: int, init: str = DEFAULT_TREE_INIT,
                     dims_per_block: int = 2, anisotropic_quantization_threshold: float = 0.2):
  """A dot-product ScaNN searcher over `db` [n, D]: tree, then AH scoring, then exact reorder.

  Args:
    db: [n, D] float32 rows (made contiguous here).
    k: neighbours a search returns by default.
    num_leaves / num_leaves_to_search: the k-means tree's size and how many leaves a query scans.
    training_sample_size: rows the tree trains on (clipped to n).
    reorder: candidates rescored exactly after the AH pass.
    init: tree centre initialisation, one of TREE_INITS.
  """
  check_tree_init(init)
  scann = import_scann()
  db = np.ascontiguousarray(db, np.float32)
  return (scann.scann_ops_pybind.builder(db, k, "dot_product")
          .tree(num_leaves=num_leaves, num_leaves_to_search=num_leaves_to_search,
                training_sample_size=min(db.shape[0], int(training_sample_size)),
                random_init=init == "random")
          .score_ah(dims_per_block,
                    anisotropic_quantization_threshold=anisotropic_quantization_threshold)
          .reorder(reorder)
          .build())


def topk_rows(scores: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
  """(indices, scores) [b, k] of each row's k largest `scores` [b, n], canonically ordered.

  Order: score descending; equal scores, the lower column index first. That holds at the k-th
  place too: when several columns tie there, the lowest indices are kept, whatever order
  argpartition left them in.
  """
  n = scores.shape[1]
  if not 1 <= k <= n:
    raise ValueError(f"k={k} must be in [1, {n}] (the number of columns)")
  top = np.argpartition(scores, n - k, axis=1)[:, n - k:]  # kth = n - k is valid for any k <= n
  top_s = np.take_along_axis(scores, top, axis=1)
  # Rows whose k-th score ties with a column left out: sort them in full (rare for float scores).
  kth = top_s.min(axis=1, keepdims=True)
  tied = (scores == kth).sum(axis=1) > (top_s == kth).sum(axis=1)
  for r in np.flatnonzero(tied):
    top[r] = np.lexsort((np.arange(n), -scores[r]))[:k]
    top_s[r] = scores[r, top[r]]
  order = np.lexsort((top, -top_s), axis=1)
  return np.take_along_axis(top, order, axis=1), np.take_along_axis(top_s, order, axis=1)
