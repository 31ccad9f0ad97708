"""Merging CALRec's N retrieved lists per user into one ranking, and its full-catalogue metrics.

At inference CALRec samples N candidate next-item texts per user; each is a BM25 query that yields
a ranked list of R item ids (0-padded).  The N lists are merged into one ranking:

- `round_robin`: rank 1 of list 0, rank 1 of list 1, ..., rank 1 of list N-1, then rank 2 of every
  list, ..., skipping items already taken and padding (0).
- `quasi_round_robin`: CALRec's "quasi-round-robin" with a modulation factor epsilon that lets
  items retrieved by many samples move up.  The paper does not publish the exact rule; ours is
  documented on the function.  epsilon = 0 is exactly `round_robin`.
- `max_score`: each item ranked by its best BM25 score over the N lists (a score-fusion baseline).

All rules run vectorised over a batch of users in `merge_batch` (sort-based grouping with numpy,
no per-user Python loop); the single-user functions are the batch code with B = 1, so the two can
never disagree.  Every rule breaks its ties by plain round-robin order, which makes the output a
deterministic function of the lists.

Metrics (`recall_ndcg`) follow seqrec_jax/metrics.py's conventions: a dict of sums plus a
"count", accumulated over batches and divided once by `normalise`.  A target that is not in the
merged ranking (the retrieved lists missed it, or it fell past top_k) counts as a miss, so the
metrics are over the full catalogue: nothing is sampled.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import numpy as np

RULES = ("round_robin", "quasi_round_robin", "max_score")
METRIC_NAMES = ("Recall", "NDCG")
DEFAULT_KS = (1, 5, 10)


# --------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------


def _merge_chunk(ids: np.ndarray, scores: Optional[np.ndarray], rule: str, epsilon: float,
                 top_k: int) -> np.ndarray:
  """Merges the lists of a chunk of users (the vectorised core of every rule).

  Every non-padding entry gets its round-robin reading position p = rank * N + list (0-based),
  the order in which plain round robin reads the entries.  Sorting each user's entries by
  (item, list, rank) groups its copies of an item; per group we reduce:
    first_pos: min p, where round robin takes the item (its best rank is first_pos // N + 1);
    n_lists:   number of distinct lists holding it;
    best:      max score over its copies (max_score only).
  One more sort by (user, rule key, first_pos) gives every user's merged order at once.

  Args:
    ids: [B, N, R] int item ids, ids <= 0 are padding.
    scores: [B, N, R] float scores, or None (only max_score needs them).
    rule: one of RULES.
    epsilon: quasi_round_robin's modulation factor.
    top_k: output width.

  Returns:
    [B, top_k] int64 merged ids, 0-padded.
  """
  b, n, r = ids.shape
  out = np.zeros((b, top_k), dtype=np.int64)
  # Sort each user's entries by (item, list, rank) with one packed int64 key per entry and a
  # row-wise sort (many small sorts are cache-friendly: ~2x faster than one global argsort).
  # Padding gets the largest key so it sorts last and is dropped.
  n_item = int(ids.max(initial=0)) + 1
  if n_item <= 1:
    return out
  width = n * r
  if float(n_item) * width >= 2**62:
    raise ValueError(f"item ids up to {n_item - 1} overflow the packed int64 sort key")
  local = (np.arange(n, dtype=np.int64)[:, None] * r + np.arange(r, dtype=np.int64)[None, :])
  key = ids.astype(np.int64) * width + local[None]  # [B, N, R]
  pad_key = np.iinfo(np.int64).max
  key = np.where(ids > 0, key, pad_key).reshape(b, width)
  perm = np.argsort(key, axis=1)
  s_key = np.take_along_axis(key, perm, axis=1).reshape(-1)
  s_row = np.repeat(np.arange(b, dtype=np.int64), width)
  valid = s_key != pad_key
  s_key, s_row = s_key[valid], s_row[valid]
  s_item, s_local = np.divmod(s_key, width)
  s_lst, s_rank = np.divmod(s_local, r)
  s_pos = s_rank * n + s_lst  # round-robin reading position

  new_group = np.ones(s_row.size, dtype=bool)
  new_group[1:] = (s_row[1:] != s_row[:-1]) | (s_item[1:] != s_item[:-1])
  # A new (item, list) pair: a second copy of an item inside one list counts once.
  new_pair = new_group.copy()
  new_pair[1:] |= s_lst[1:] != s_lst[:-1]
  starts = np.flatnonzero(new_group)
  g_row = s_row[starts]
  g_item = s_item[starts]
  first_pos = np.minimum.reduceat(s_pos, starts)

  # The merged order is a sort by (row, rule code, first_pos), where the rule code is a small
  # integer (0 for round robin).  Packing the three into one int64 key and argsorting is ~5x
  # faster than np.lexsort on the same keys; the codes are dense ranks, so the key is exact.
  if rule == "round_robin":
    code, n_codes = np.zeros_like(first_pos), 1
  elif rule == "quasi_round_robin":
    n_lists = np.add.reduceat(new_pair.astype(np.int64), starts)
    best_rank = first_pos // n + 1
    # eff_round depends only on (best_rank, n_lists), an R x N table: rank that table once.
    # Rounding makes equal effective rounds tie exactly despite float error (3 - 0.1 * 10 vs 2),
    # so those ties fall to round-robin order as documented.
    table = np.arange(1, r + 1)[:, None] - epsilon * np.arange(n)[None, :]  # [R, N]
    _, table_code = np.unique(np.round(table, 9), return_inverse=True)
    table_code = table_code.reshape(r, n)
    code, n_codes = table_code[best_rank - 1, n_lists - 1], r * n
  elif rule == "max_score":
    if scores is None:
      raise ValueError("max_score needs scores")
    s_sc = np.take_along_axis(scores.reshape(b, width), perm, axis=1).reshape(-1)[valid]
    s_sc = s_sc.astype(np.float64)
    best = np.maximum.reduceat(s_sc, starts)
    _, code = np.unique(-best, return_inverse=True)  # dense rank, highest score = 0
    n_codes = int(code.max()) + 1
  else:
    raise ValueError(f"unknown merge rule {rule!r}; expected one of {RULES}")
  if float(b) * n_codes * width < 2**62:
    order = np.argsort((g_row * n_codes + code) * width + first_pos)
  else:
    order = np.lexsort((first_pos, code, g_row))

  o_row, o_item = g_row[order], g_item[order]
  # Position of each group inside its user's merged list: index minus the user's first index.
  row_start = np.concatenate([[0], np.cumsum(np.bincount(o_row, minlength=b))[:-1]])
  place = np.arange(o_row.size) - row_start[o_row]
  keep = place < top_k
  out[o_row[keep], place[keep]] = o_item[keep]
  return out


def merge_batch(ids: np.ndarray, scores: Optional[np.ndarray] = None,
                rule: str = "quasi_round_robin", epsilon: float = 0.0, top_k: int = 10,
                chunk_size: int = 1024) -> np.ndarray:
  """Merges every user's N retrieved lists into one top_k ranking.

  Vectorised over users (no per-user Python loop); users are processed `chunk_size` at a time so
  that the temporary arrays stay at O(chunk_size * N * R).

  Args:
    ids: [B, N, R] int item ids per user, list and rank (best first), 0 = padding.
    scores: [B, N, R] float BM25 scores aligned with ids; needed by "max_score" only.
    rule: "round_robin", "quasi_round_robin" or "max_score".
    epsilon: quasi_round_robin's modulation factor (>= 0; ignored by the other rules).
    top_k: width of the merged ranking.
    chunk_size: users merged per vectorised step.

  Returns:
    [B, top_k] int64 merged item ids, best first, 0-padded where fewer than top_k distinct
    items were retrieved.
  """
  ids = np.asarray(ids)
  if ids.ndim != 3:
    raise ValueError(f"ids must be [B, N, R] (got shape {ids.shape})")
  if scores is not None:
    scores = np.asarray(scores)
    if scores.shape != ids.shape:
      raise ValueError(f"scores shape {scores.shape} != ids shape {ids.shape}")
  if rule not in RULES:
    raise ValueError(f"unknown merge rule {rule!r}; expected one of {RULES}")
  if rule == "max_score" and scores is None:
    raise ValueError("max_score needs scores")
  if epsilon < 0:
    raise ValueError(f"epsilon must be >= 0 (got {epsilon}); it only ever promotes consensus")
  if top_k < 1:
    raise ValueError(f"top_k must be >= 1 (got {top_k})")
  b = ids.shape[0]
  out = np.zeros((b, top_k), dtype=np.int64)
  for s in range(0, b, chunk_size):
    e = min(s + chunk_size, b)
    out[s:e] = _merge_chunk(ids[s:e], None if scores is None else scores[s:e], rule,
                            float(epsilon), top_k)
  return out


def _merge_one(ids, scores, rule, epsilon) -> np.ndarray:
  """One user's full merged list (no truncation), trailing padding removed."""
  ids = np.asarray(ids)
  if ids.ndim != 2:
    raise ValueError(f"ids must be [N, R] (got shape {ids.shape})")
  sc = None if scores is None else np.asarray(scores)[None]
  merged = merge_batch(ids[None], sc, rule, epsilon, top_k=max(ids.size, 1))[0]
  return merged[merged > 0]


def round_robin(ids: np.ndarray, scores: Optional[np.ndarray] = None) -> np.ndarray:
  """Plain round-robin merge of one user's lists.

  Reads rank 1 of list 0, rank 1 of list 1, ..., rank 1 of list N-1, then rank 2 of every list,
  and so on, keeping each item the first time it is read and skipping padding (0).

  Args:
    ids: [N, R] item ids (list, rank), 0 = padding.
    scores: unused; accepted so that every rule has the same signature.

  Returns:
    [M] int64 distinct item ids, M <= N * R.
  """
  del scores
  return _merge_one(ids, None, "round_robin", 0.0)


def quasi_round_robin(ids: np.ndarray, scores: Optional[np.ndarray] = None,
                      epsilon: float = 0.0) -> np.ndarray:
  """CALRec's quasi-round-robin merge of one user's lists (our documented rule).

  Rule: each distinct item i gets an *effective round*

      round_eps(i) = best_rank(i) - epsilon * (n_lists(i) - 1),

  where best_rank(i) is its best (smallest, 1-based) rank over the N lists and n_lists(i) the
  number of lists that contain it.  Items are emitted in increasing effective round; ties go in
  plain round-robin order (the order in which `round_robin` would first read them).

  Why this is "take rank 1 of every list, then rank 2, ..., skipping duplicates, with a
  modulation factor that lets items retrieved by many samples move up":
    - Plain round robin emits an item in the round equal to its best rank (round t reads the
      rank-t entries of all lists; an item is taken the first time it is read, i.e. at its best
      rank), and within a round in list order.  So round robin *is* "sort by best rank, ties by
      round-robin reading order"; with epsilon = 0 the rule above is exactly that.
    - Consensus modulates the round: every extra sample whose retrieval also contains the item
      moves it epsilon rounds earlier.  Being found by many sampled texts is evidence that the
      item fits the user beyond any single sample's phrasing, which is what the modulation is for.
      Duplicates are still skipped: an item is emitted once, at its effective round.
    - epsilon is in units of rounds: with epsilon = 0.5, an item found by 3 lists at best rank 3
      ties with single-list rank-2 items and goes after them; with epsilon > R - 1 the order is
      by n_lists first (a vote count), best rank second.

  Args:
    ids: [N, R] item ids (list, rank), 0 = padding.
    scores: unused; accepted so that every rule has the same signature.
    epsilon: modulation factor in rounds per extra list, >= 0.

  Returns:
    [M] int64 distinct item ids.
  """
  del scores
  return _merge_one(ids, None, "quasi_round_robin", epsilon)


def max_score(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """Merges one user's lists by each item's maximum BM25 score over the lists.

  Ties (equal best scores) go in plain round-robin order.  BM25 scores of different queries are
  on different scales (longer queries score higher), which is why round robin is CALRec's rule
  and this one is a baseline.

  Args:
    ids: [N, R] item ids, 0 = padding.
    scores: [N, R] scores aligned with ids.

  Returns:
    [M] int64 distinct item ids, highest best score first.
  """
  return _merge_one(ids, scores, "max_score", 0.0)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def metric_keys(ks: Sequence[int] = DEFAULT_KS) -> list:
  """["Recall@1", "Recall@5", "Recall@10", "NDCG@1", ...] (metric-major, like the spine)."""
  return [f"{m}@{k}" for m in METRIC_NAMES for k in ks]


def recall_ndcg(ranked: np.ndarray, targets: np.ndarray, ks: Sequence[int] = DEFAULT_KS,
                weights: Optional[np.ndarray] = None) -> Dict[str, float]:
  """Sums of Recall@k and NDCG@k over a batch with one held-out target per user.

  With a single relevant item, Recall@k is 1 when the target is in the top k, and NDCG@k is
  1 / log2(rank + 1) for its 1-based rank (the ideal DCG is 1).  A target absent from `ranked`
  is a miss (0 for every k).

  Args:
    ranked: [B, K] merged item ids, best first, 0-padded.
    targets: [B] target item ids (> 0 for every counted row).
    ks: cut-offs, each <= K (a cut-off past the ranking's width could not be measured).
    weights: optional [B] row weights (1 real, 0 padding rows); default all 1.

  Returns:
    {"Recall@k": sum, "NDCG@k": sum, ..., "count": sum of weights}, Python floats; combine
    batches with `accumulate` and divide with `normalise`.
  """
  ranked = np.asarray(ranked)
  targets = np.asarray(targets).reshape(-1)
  if ranked.ndim != 2 or ranked.shape[0] != targets.shape[0]:
    raise ValueError(f"ranked {ranked.shape} must be [B, K] with B = len(targets) "
                     f"({targets.shape[0]})")
  width = ranked.shape[1]
  if any(k < 1 or k > width for k in ks):
    raise ValueError(f"every k in {tuple(ks)} must be in [1, K={width}]")
  w = (np.ones(targets.shape, np.float64) if weights is None
       else np.asarray(weights, np.float64).reshape(-1))
  if np.any((targets <= 0) & (w != 0)):
    raise ValueError("targets must be real item ids (> 0); 0 is padding")
  hit = (ranked == targets[:, None]) & (ranked > 0)
  found = hit.any(axis=1)
  rank0 = np.argmax(hit, axis=1)  # 0-based; meaningless where not found (masked below)
  gain = np.where(found, 1.0 / np.log2(rank0 + 2.0), 0.0)
  out = {}
  for k in ks:
    inside = found & (rank0 < k)
    out[f"Recall@{k}"] = float(np.sum(inside * w))
  for k in ks:
    inside = found & (rank0 < k)
    out[f"NDCG@{k}"] = float(np.sum(np.where(inside, gain, 0.0) * w))
  out["count"] = float(np.sum(w))
  return out


def accumulate(total: Optional[Dict[str, float]],
               batch_sums: Mapping[str, float]) -> Dict[str, float]:
  """Adds two sum dicts (None starts a new total)."""
  if total is None:
    return dict(batch_sums)
  return {k: total[k] + batch_sums[k] for k in total}


def normalise(sums: Mapping[str, float], ks: Sequence[int] = DEFAULT_KS) -> Dict[str, float]:
  """Divides accumulated sums by the count.

  Args:
    sums: output of `recall_ndcg` / `accumulate`.
    ks: the cut-offs the sums were computed with.

  Returns:
    {"Recall@1": mean, ..., "NDCG@10": mean}.
  """
  count = float(sums["count"])
  if count <= 0:
    raise ValueError("no evaluation rows were counted (count == 0)")
  return {key: float(sums[key]) / count for key in metric_keys(ks)}
