"""Length-bucketed encoding (`seqrec_jax.buckets`): same outputs as the dense pass, planned widths."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqrec_jax import buckets
from seqrec_jax.models import BERT4Rec, BERT4RecConfig, GRU4Rec, GRU4RecConfig, SASRec, SASRecConfig


def _left_padded(rng, n, length, n_items, spans):
  x = np.zeros((n, length), np.int32)
  for i, s in enumerate(spans):
    if s:
      x[i, length - s:] = rng.integers(1, n_items + 1, s)
  return x


def test_required_widths_counts_from_the_first_item():
  x = jnp.asarray([[0, 0, 0, 0, 0],    # padding alone
                   [0, 0, 0, 0, 7],    # one item
                   [0, 3, 0, 0, 7],    # a hole: the span still starts at the first item
                   [1, 2, 3, 4, 5]])   # full
  np.testing.assert_array_equal(buckets.required_widths(x), [0, 1, 4, 5])
  np.testing.assert_array_equal(buckets.required_widths(x, slack=1), [0, 2, 5, 5])
  np.testing.assert_array_equal(buckets.required_widths_np([0, 1, 4, 5], 5, 1), [0, 2, 5, 5])


def _brute_force_cost(need, max_len, max_buckets, n_std):
  """Fewest columns over every width subset, by enumeration (independent of make_plan's DP)."""
  counts = (need[:, :, None] <= np.arange(max_len + 1)).sum(1)
  cap = np.minimum(counts.min(0), np.floor(counts.mean(0) - n_std * counts.std(0)))
  cap = np.maximum.accumulate(np.clip(cap, 0, need.shape[1]).astype(int))
  cap[max_len] = need.shape[1]
  best = None
  for m in range(0, max_buckets):
    for ws in itertools.combinations(range(1, max_len), m):
      ws = list(ws) + [max_len]
      lo, cost = 0, 0
      for w in ws:
        cost += (cap[w] - lo) * w
        lo = cap[w]
      best = cost if best is None else min(best, cost)
  return best


@pytest.mark.parametrize("max_buckets", [1, 2, 4])
def test_make_plan_is_the_cheapest_plan_the_samples_fit(max_buckets):
  rng = np.random.default_rng(0)
  max_len = 12
  spans = np.minimum(rng.geometric(0.2, size=(40, 300)), max_len)  # short rows dominate
  need = buckets.required_widths_np(spans, max_len)
  plan = buckets.make_plan(need, max_len, max_buckets, n_std=2.0)
  assert plan.rows == 300 and plan.widths[-1] == max_len and len(plan.widths) <= max_buckets
  cost = sum(w * n for w, n in zip(plan.widths, plan.sizes))
  assert cost == _brute_force_cost(need, max_len, max_buckets, 2.0)
  # Every sampled batch fits: sorted, the last row of each bucket needs at most its width.
  ends = np.cumsum(plan.sizes) - 1
  for row in need:
    s = np.sort(row)
    assert all(s[e] <= w for e, w, n in zip(ends, plan.widths, plan.sizes) if n)
  if max_buckets > 1:
    assert plan.cost_fraction() < 0.7  # geometric spans: most columns are padding


def test_plan_and_apply_reject_bad_input():
  with pytest.raises(ValueError, match="strictly increasing"):
    buckets.Plan((4, 4), (1, 1))
  with pytest.raises(ValueError, match="needs width 9 > max_len 8"):
    buckets.make_plan(np.full((2, 3), 9), 8, 2)
  with pytest.raises(ValueError, match="covers 5 rows, the inputs have 4"):
    buckets.bucketed_apply(lambda x, k: x, jnp.zeros((4, 8), jnp.int32), jax.random.key(0),
                           buckets.Plan((2, 8), (3, 2)))


def _right_weighted(x, key):
  """A per-row function that only sees items by their distance from the end (cut-invariant)."""
  del key
  w = jnp.arange(x.shape[1], 0, -1, dtype=jnp.float32)  # distance from the end
  return jnp.stack([jnp.sum(x * w, 1), jnp.sum((x > 0) * 1.0, 1)], axis=1)


def test_bucketed_apply_matches_dense_and_falls_back_on_overflow():
  rng = np.random.default_rng(1)
  length, n = 10, 64
  plan = buckets.Plan((2, 5, 10), (32, 16, 16))
  spans = np.concatenate([rng.integers(0, 3, 32), rng.integers(3, 6, 16), rng.integers(6, 11, 16)])
  x = jnp.asarray(_left_padded(rng, n, length, 50, rng.permutation(spans)))
  dense = _right_weighted(x, None)
  out, overflow = jax.jit(lambda x: buckets.bucketed_apply(_right_weighted, x, jax.random.key(0),
                                                          plan))(x)
  assert not bool(overflow)
  np.testing.assert_array_equal(out, dense)
  # 17 rows wider than 5 do not fit the plan's 16: the full-width fallback, same outputs.
  spans[31] = 9
  x2 = jnp.asarray(_left_padded(rng, n, length, 50, spans))
  out2, overflow2 = buckets.bucketed_apply(_right_weighted, x2, jax.random.key(0), plan)
  assert bool(overflow2)
  np.testing.assert_array_equal(out2, _right_weighted(x2, None))
  # A width-cutting function that is NOT cut-invariant shows the buckets really are narrower.
  widths, _ = buckets.bucketed_apply(lambda x, k: jnp.full((x.shape[0], 1), x.shape[1]), x,
                                     jax.random.key(0), plan)
  np.testing.assert_array_equal(np.sort(np.asarray(widths)[:, 0]), [2] * 32 + [5] * 16 + [10] * 16)


def _models(n_items, length):
  return [
      ("sasrec", SASRec(SASRecConfig(n_items=n_items, max_len=length, hidden=16, n_heads=2,
                                     inner=32, n_layers=2))),
      ("bert4rec", BERT4Rec(BERT4RecConfig(n_items=n_items, max_len=length, hidden=16, n_heads=2,
                                           inner=32, n_layers=2))),
      ("gru4rec", GRU4Rec(GRU4RecConfig(n_items=n_items, max_len=length, hidden=16,
                                        gru_hidden=24))),
  ]


@pytest.mark.parametrize("name", ["sasrec", "bert4rec", "gru4rec"])
def test_backbones_give_the_same_vectors_bucketed(name):
  """Every backbone's sequence vector is unchanged when leading padding is cut (plus its slack):
  bucketed vs dense, deterministic, holes included."""
  rng = np.random.default_rng(2)
  n_items, length, n = 30, 12, 48
  model = dict(_models(n_items, length))[name]
  spans = np.concatenate([rng.integers(1, 4, 24), rng.integers(4, 8, 12), rng.integers(8, 13, 12)])
  x = _left_padded(rng, n, length, n_items, spans)
  x[5, length - 2] = 0 if spans[5] >= 3 else x[5, length - 2]  # a hole inside one row
  x = jnp.asarray(x)
  params = model.init({"params": jax.random.key(0)}, x[:2])["params"]
  slack = buckets.truncation_slack(model)
  assert slack == (1 if name == "bert4rec" else 0)
  fn = lambda z, key: model.apply({"params": params}, z, train=False)
  need = np.asarray(buckets.required_widths(x, slack))
  plan = buckets.make_plan(need[None], length, 3, n_std=0.0)
  assert len(plan.widths) == 3 and plan.widths[0] < length
  out, overflow = buckets.bucketed_apply(fn, x, jax.random.key(0), plan, slack)
  assert not bool(overflow)
  np.testing.assert_allclose(out, fn(x, None), rtol=1e-5, atol=1e-6)
  if name == "bert4rec":
    # Without its slack BERT4Rec would lose the oldest item of rows that fill their bucket.
    need0 = np.asarray(buckets.required_widths(x, 0))
    plan0 = buckets.make_plan(need0[None], length, 3, n_std=0.0)
    out0, _ = buckets.bucketed_apply(fn, x, jax.random.key(0), plan0, 0)
    assert not np.allclose(out0, fn(x, None), rtol=1e-5, atol=1e-6)
