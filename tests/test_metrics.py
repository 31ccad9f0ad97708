"""Full-ranking metrics: hand-computed cases (with ties) and a brute-force numpy reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqrec_jax import metrics


def _np_reference(scores, targets, weights, ks, exclude=None):
  """Independent numpy implementation: rank by argsort, pessimistic ties."""
  scores = np.array(scores, dtype=np.float64)
  if exclude is not None:
    for b, row in enumerate(exclude):
      for item in row:
        if item != 0 and item != targets[b]:
          scores[b, item] = -np.inf
  sums = {f"{m}@{k}": 0.0 for m in ("HR", "NDCG", "MRR") for k in ks}
  for b in range(scores.shape[0]):
    t = targets[b]
    others = np.delete(np.arange(scores.shape[1]), t)
    rank = int(np.sum(scores[b, others] >= scores[b, t]))
    for k in ks:
      if rank < k:
        sums[f"HR@{k}"] += weights[b]
        sums[f"NDCG@{k}"] += weights[b] / math.log2(rank + 2)
        sums[f"MRR@{k}"] += weights[b] / (rank + 1)
  return {k: v / sum(weights) for k, v in sums.items()}


@pytest.mark.parametrize("scores,target,expected_rank", [
    ([-np.inf, 0.9, 0.5, 0.1], 1, 0),   # best item
    ([-np.inf, 0.9, 0.5, 0.1], 3, 2),   # worst item
    ([-np.inf, 0.5, 0.5, 0.1], 1, 1),   # tie with one other: pessimistic rank 1
    ([-np.inf, 0.5, 0.5, 0.5], 2, 2),   # everything tied: worst rank
    ([-np.inf, 0.2, 0.5, 0.2], 3, 2),   # tie (item 1) plus a better item (2)
])
def test_hand_ranks(scores, target, expected_rank):
  ranks = metrics.target_ranks(jnp.array([scores], jnp.float32), jnp.array([target]))
  assert int(ranks[0]) == expected_rank


def test_hand_metric_values():
  # ranks 0, 2, 9, 25 with K in {5, 10, 20}; the 4th row is padding (weight 0).
  ranks = jnp.array([0, 2, 9, 25])
  w = jnp.array([1.0, 1.0, 1.0, 0.0])
  s = metrics.ranking_sums(ranks, w, ks=(5, 10, 20))
  assert float(s["count"]) == 3.0
  assert float(s["HR@5"]) == pytest.approx(2.0)
  assert float(s["HR@10"]) == pytest.approx(3.0)
  assert float(s["NDCG@5"]) == pytest.approx(1.0 + 1 / math.log2(4))
  assert float(s["NDCG@10"]) == pytest.approx(1.0 + 1 / math.log2(4) + 1 / math.log2(11))
  assert float(s["MRR@10"]) == pytest.approx(1.0 + 1 / 3 + 1 / 10)
  assert float(s["MRR@20"]) == pytest.approx(1.0 + 1 / 3 + 1 / 10)
  out = metrics.normalise(jax.device_get(s), ks=(5, 10, 20))
  assert out["HR@10"] == pytest.approx(1.0)
  assert out["HR@5"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_numpy_bruteforce(seed):
  rng = np.random.default_rng(seed)
  b, v = 64, 300
  # Quantised scores force many ties.
  scores = np.round(rng.normal(size=(b, v)), 1).astype(np.float32)
  scores[:, 0] = -np.inf
  targets = rng.integers(1, v, size=b)
  weights = (rng.random(b) > 0.1).astype(np.float32)
  ranks = metrics.target_ranks(jnp.asarray(scores), jnp.asarray(targets))
  got = metrics.normalise(jax.device_get(metrics.ranking_sums(ranks, jnp.asarray(weights))))
  want = _np_reference(scores, targets, weights, (5, 10, 20))
  for k in want:
    assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k


def test_exclude_seen_matches_reference():
  rng = np.random.default_rng(3)
  b, v, h = 32, 200, 15
  scores = rng.normal(size=(b, v)).astype(np.float32)
  scores[:, 0] = -np.inf
  targets = rng.integers(1, v, size=b)
  history = rng.integers(0, v, size=(b, h))
  history[:5, 0] = targets[:5]  # re-purchase: the target stays rankable
  weights = np.ones(b, np.float32)
  ranks = metrics.target_ranks(jnp.asarray(scores), jnp.asarray(targets), jnp.asarray(history))
  got = metrics.normalise(jax.device_get(metrics.ranking_sums(ranks, jnp.asarray(weights))))
  want = _np_reference(scores, targets, weights, (5, 10, 20), exclude=history)
  for k in want:
    assert got[k] == pytest.approx(want[k], rel=1e-5), k
  plain = metrics.target_ranks(jnp.asarray(scores), jnp.asarray(targets))
  assert np.all(np.asarray(ranks) <= np.asarray(plain))
  assert np.any(np.asarray(ranks) < np.asarray(plain))


def test_metrics_sharded_over_items_equal_unsharded():
  mesh = jax.make_mesh((2, 4), ("data", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rng = np.random.default_rng(4)
  scores = rng.normal(size=(16, 64)).astype(np.float32)
  targets = rng.integers(1, 64, size=16)
  sharded = jax.device_put(scores, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data", "tensor")))
  fn = jax.jit(lambda s, t: metrics.ranking_sums(metrics.target_ranks(s, t), jnp.ones(16)))
  a = jax.device_get(fn(sharded, jnp.asarray(targets)))
  b = jax.device_get(fn(jnp.asarray(scores), jnp.asarray(targets)))
  for k in a:
    assert float(a[k]) == pytest.approx(float(b[k])), k


def test_normalise_rejects_empty():
  with pytest.raises(ValueError, match="count"):
    metrics.normalise({"count": 0.0, **{k: 0.0 for k in metrics.metric_keys()}})
