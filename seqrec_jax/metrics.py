"""Full-ranking metrics (HR@K, NDCG@K, MRR@K) computed inside jit as (sum, count).

Every item of the catalogue is ranked; no sampled negatives.

Tie rule (pessimistic): the target's 0-based rank is the number of *other* items whose score is
greater than or equal to the target's score.  A model that scores everything equal therefore gets
the worst rank, never the best, and a float model essentially never ties.

The padding row and filler rows carry -inf scores and so never outrank a real target.  With
`exclude` (history items), those items get -inf too, except the target itself, so a re-purchase
target stays rankable.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

METRIC_NAMES = ("HR", "NDCG", "MRR")
DEFAULT_KS = (5, 10, 20)


def metric_keys(ks: Sequence[int] = DEFAULT_KS) -> list:
  """["HR@5", "HR@10", ..., "MRR@20"] in the order results.json uses."""
  return [f"{m}@{k}" for m in METRIC_NAMES for k in ks]


def target_ranks(scores: jax.Array, targets: jax.Array,
                 exclude: Optional[jax.Array] = None) -> jax.Array:
  """0-based pessimistic rank of each target among all items.

  Args:
    scores: [B, V] float scores (-inf for rows that are not items).
    targets: [B] int target item ids.
    exclude: optional [B, H] int item ids to remove from the ranking (0 entries are ignored: row 0
      is padding and already -inf).

  Returns:
    [B] int32 ranks.
  """
  b, v = scores.shape
  if exclude is not None:
    hit = jnp.zeros((b, v), dtype=bool).at[jnp.arange(b)[:, None], exclude].set(True)
    hit = hit & (jnp.arange(v)[None, :] != targets[:, None])
    scores = jnp.where(hit, -jnp.inf, scores)
  target_score = jnp.take_along_axis(scores, targets[:, None], axis=1)  # [B, 1]
  # Items scoring >= the target, minus the target itself.
  return jnp.sum(scores >= target_score, axis=1, dtype=jnp.int32) - 1


def ranking_sums(ranks: jax.Array, weights: jax.Array,
                 ks: Sequence[int] = DEFAULT_KS) -> Dict[str, jax.Array]:
  """Weighted sums of HR/NDCG/MRR@K over a batch, plus the weight total under "count".

  Args:
    ranks: [B] 0-based ranks.
    weights: [B] 1 for real rows, 0 for padding rows.
    ks: cut-offs.

  Returns:
    {"HR@5": sum, ..., "count": sum of weights}, all float32 scalars.
  """
  ranks = ranks.astype(jnp.float32)
  out = {}
  for k in ks:
    for name, values in _values_at(jnp, ranks, k).items():
      out[f"{name}@{k}"] = jnp.sum(values * weights)
  out["count"] = jnp.sum(weights)
  return out


def _values_at(xp, ranks, k: int) -> Dict[str, Any]:
  """Each row's HR, NDCG and MRR at cut-off k from its 0-based (float) rank; `xp` is jnp inside
  jit (`ranking_sums`) or np on the host (`per_row`)."""
  inside = (ranks < k).astype(ranks.dtype)
  return {"HR": inside, "NDCG": inside / xp.log2(ranks + 2.0), "MRR": inside / (ranks + 1.0)}


def normalise(sums: Mapping[str, float], ks: Sequence[int] = DEFAULT_KS) -> Dict[str, float]:
  """Host-side: divides accumulated sums by the count."""
  sums = {k: float(np.asarray(v)) for k, v in sums.items()}
  count = sums["count"]
  if count <= 0:
    raise ValueError("no evaluation rows were counted (count == 0)")
  return {key: sums[key] / count for key in metric_keys(ks)}


def accumulate(total: Optional[Dict[str, jax.Array]],
               batch_sums: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
  """Adds two sum dicts (on device, no host transfer)."""
  if total is None:
    return dict(batch_sums)
  return {k: total[k] + batch_sums[k] for k in total}


def per_row(ranks: np.ndarray, metric: str) -> np.ndarray:
  """Host-side: each row's value of `metric` ("HR@10", "NDCG@20", "MRR@5", ...) from its 0-based
  rank, so that the mean over rows is the metric `normalise` reports."""
  name, _, k = metric.partition("@")
  if name not in METRIC_NAMES or not k.isdigit() or int(k) < 1:
    raise ValueError(f"unknown metric {metric!r}: expected one of {METRIC_NAMES} '@' a cut-off "
                     "such as NDCG@10")
  return _values_at(np, np.asarray(ranks, dtype=np.float64), int(k))[name]
