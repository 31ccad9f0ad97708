"""Large-catalogue losses and ranking (seqrec_jax/large_catalog.py) on an 8-device CPU mesh:
sharded / chunked CE == plain CE (values and gradients), sharded top-k == lax.top_k, sampled
softmax's convergence to the full CE, the synthetic power-law data, and train steps through the
loop with config.model.softmax = "sharded" / "sampled"."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

from seqrec_jax import data as data_lib
from seqrec_jax import large_catalog as lc
from seqrec_jax import loop, models, sharding, tasks
from seqrec_jax import metrics as metrics_lib
from seqrec_jax.config_check import validate_config
from seqrec_jax.default_config import base_config
from seqrec_jax.models import layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, D, V, N_ITEMS = 16, 8, 64, 50  # rows 51..63 are filler (a whole shard of them at tensor=8)


def _problem(seed=0, b=B, d=D, v=V, n_items=N_ITEMS):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  hidden = jax.random.normal(k1, (b, d))
  table = jax.random.normal(k2, (v, d))
  targets = jax.random.randint(k3, (b,), 1, n_items + 1)
  return hidden, table, targets


def _plain_ce(hidden, table, targets, n_items=N_ITEMS):
  """The reference: the models' masked [B, V] logits and optax's CE."""
  logits = layers.mask_non_items(hidden @ table.T, n_items)  # [B, V]
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def _weighted(fn):
  """A scalar with distinct per-row weights, so gradient bugs cannot cancel out."""
  return lambda h, t, y: jnp.sum(fn(h, t, y) * jnp.linspace(0.5, 2.0, h.shape[0]))


@pytest.mark.parametrize("mesh_shape", [{"data": 2, "tensor": 4}, {"data": 1, "tensor": 8},
                                        {"data": 2, "fsdp": 2, "tensor": 2}])
@pytest.mark.parametrize("chunk", [3, None])
def test_sharded_ce_equals_plain_ce(mesh_shape, chunk):
  p = sharding.Partitioner(sharding.make_mesh(mesh_shape))
  hidden, table, targets = _problem()
  # Laid out as in training: table [vocab, embed] -> (tensor, fsdp), batch over (data, fsdp).
  table_s = jax.device_put(table, NamedSharding(p.mesh, P("tensor", "fsdp")))
  hidden_s = jax.device_put(hidden, p.batch_sharding(2))

  def sharded(h, t, y):  # mesh and axes from the Partitioner's context, as in the train step
    return lc.sharded_softmax_cross_entropy(h, t, y, n_items=N_ITEMS, chunk_size=chunk)

  with p.context():
    value = jax.jit(sharded)(hidden_s, table_s, targets)
    grads = jax.jit(jax.grad(_weighted(sharded), argnums=(0, 1)))(hidden_s, table_s, targets)
  np.testing.assert_allclose(value, _plain_ce(hidden, table, targets), rtol=1e-5, atol=1e-5)
  ref_grads = jax.grad(_weighted(_plain_ce), argnums=(0, 1))(hidden, table, targets)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  # The table's gradient comes back item-sharded like the table (no gathered [V, D] copy).
  assert {s.data.shape[0] for s in grads[1].addressable_shards} == {V // p.mesh.shape["tensor"]}


def test_sharded_ce_with_an_explicit_partitioner_and_uneven_batch():
  """mesh= a Partitioner, outside any context; a batch of 6 does not split over data=4."""
  p = sharding.Partitioner(sharding.make_mesh({"data": 4, "tensor": 2}))
  hidden, table, targets = _problem(seed=1, b=6)
  got = jax.jit(functools.partial(lc.sharded_softmax_cross_entropy, n_items=N_ITEMS, mesh=p,
                                  chunk_size=5))(hidden, table, targets)
  np.testing.assert_allclose(got, _plain_ce(hidden, table, targets), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 16, 64, None])
def test_chunked_path_equals_plain_ce(chunk):
  """One item shard (no mesh): a blocked scan; 7 leaves a clamped, overlapping last block."""
  hidden, table, targets = _problem(seed=2)
  fn = functools.partial(lc.sharded_softmax_cross_entropy, n_items=N_ITEMS, chunk_size=chunk)
  np.testing.assert_allclose(jax.jit(fn)(hidden, table, targets),
                             _plain_ce(hidden, table, targets), rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.grad(_weighted(fn), argnums=(0, 1)))(hidden, table, targets)
  ref_grads = jax.grad(_weighted(_plain_ce), argnums=(0, 1))(hidden, table, targets)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_chunked_path_in_bfloat16_matches_the_full_path_in_bfloat16():
  hidden, table, targets = _problem(seed=3)
  hidden = hidden.astype(jnp.bfloat16)
  got = lc.sharded_softmax_cross_entropy(hidden, table, targets, n_items=N_ITEMS, chunk_size=16)
  logits = layers.mask_non_items(hidden @ table.astype(jnp.bfloat16).T, N_ITEMS)
  want = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
  assert got.dtype == jnp.float32


def _largest_intermediate(jaxpr) -> int:
  """Elements of the largest value any equation produces, looking inside scans, pjits, ..."""
  biggest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      biggest = max(biggest, int(np.prod(getattr(var.aval, "shape", ()))))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          biggest = max(biggest, _largest_intermediate(sub))
  return biggest


def test_chunked_loss_and_gradient_never_hold_batch_by_catalogue_logits():
  b, d, v, chunk = 32, 4, 2048, 64
  hidden, table, targets = _problem(seed=4, b=b, d=d, v=v, n_items=v - 1)
  fn = functools.partial(lc.sharded_softmax_cross_entropy, n_items=v - 1, chunk_size=chunk)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(lambda h, t: fn(h, t, targets).sum(),
                                            argnums=(0, 1)))(hidden, table)
  # The table and its gradient ([V, D] = 8192) are the largest values; [B, V] would be 65536.
  assert _largest_intermediate(jaxpr.jaxpr) == v * d
  full = jax.make_jaxpr(jax.value_and_grad(
      lambda h, t: _plain_ce(h, t, targets, v - 1).sum(), argnums=(0, 1)))(hidden, table)
  assert _largest_intermediate(full.jaxpr) >= b * v  # the check does see [B, V] when it is there


@pytest.mark.parametrize("mesh_shape", [None, {"data": 2, "tensor": 4}, {"data": 1, "tensor": 8}])
def test_sharded_top_k_equals_lax_top_k(mesh_shape):
  hidden, table, _ = _problem(seed=5)
  # Duplicate rows make exact ties across blocks and shards: lower ids must come first.
  table = table.at[40].set(table[3]).at[17].set(table[3]).at[33].set(table[9])
  want_vals, want_ids = jax.lax.top_k(layers.mask_non_items(hidden @ table.T, N_ITEMS), 10)
  mesh = sharding.Partitioner(sharding.make_mesh(mesh_shape)) if mesh_shape else None
  for chunk in (None, 4, 10, 11):  # 4 < k: blocks are widened to k rows
    vals, ids = jax.jit(functools.partial(lc.sharded_top_k, k=10, n_items=N_ITEMS, mesh=mesh,
                                          chunk_size=chunk))(hidden, table)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(vals, want_vals, rtol=1e-6, atol=1e-6)
  assert int(ids.max()) <= N_ITEMS and int(ids.min()) >= 1
  with pytest.raises(ValueError, match="exceeds"):
    lc.sharded_top_k(hidden, table, V + 1, n_items=N_ITEMS, mesh=mesh)


@pytest.mark.parametrize("mesh_shape", [None, {"data": 2, "tensor": 4}, {"data": 1, "tensor": 8},
                                        {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_target_ranks_equal_dense_ranks(mesh_shape):
  hidden, table, targets = _problem(seed=6)
  # Histories with padding 0, repeats, the target itself and filler-free ids.
  history = jax.random.randint(jax.random.key(7), (B, 12), 0, N_ITEMS + 1)
  history = history.at[:, 0].set(targets).at[:, 1].set(history[:, 2])
  scores = layers.mask_non_items(hidden @ table.T, N_ITEMS)  # [B, V]
  mesh = sharding.Partitioner(sharding.make_mesh(mesh_shape)) if mesh_shape else None
  for exclude in (None, history):
    want = metrics_lib.target_ranks(scores, targets, exclude)
    for chunk in (None, 3, 7, 8):
      got = jax.jit(functools.partial(lc.sharded_target_ranks, n_items=N_ITEMS, mesh=mesh,
                                      chunk_size=chunk))(hidden, table, targets, exclude=exclude)
      np.testing.assert_array_equal(got, want)
  # Excluding the history can only improve a target's rank, and it does for some row here.
  dense = metrics_lib.target_ranks(scores, targets)
  assert np.all(np.asarray(want) <= np.asarray(dense)) and np.any(np.asarray(want) < np.asarray(dense))
  # An independent numpy count of the plain rank.
  s = np.asarray(scores, np.float64)
  t = np.asarray(targets)
  ref = (s >= s[np.arange(B), t][:, None]).sum(1) - 1
  np.testing.assert_array_equal(np.asarray(dense), ref)


def test_sharded_target_ranks_never_hold_batch_by_catalogue_scores():
  b, d, v, chunk = 32, 4, 2048, 64
  hidden, table, targets = _problem(seed=8, b=b, d=d, v=v, n_items=v - 1)
  history = jnp.zeros((b, 16), jnp.int32)
  jaxpr = jax.make_jaxpr(functools.partial(lc.sharded_target_ranks, n_items=v - 1,
                                           chunk_size=chunk))(hidden, table, targets,
                                                              exclude=history)
  # One block of scores is the largest value; [B, V] would be 65536.
  assert _largest_intermediate(jaxpr.jaxpr) == b * chunk
  dense = jax.make_jaxpr(lambda h, t: metrics_lib.target_ranks(
      layers.mask_non_items(h @ t.T, v - 1), targets, history))(hidden, table)
  assert _largest_intermediate(dense.jaxpr) >= b * v  # the check does see [B, V] when it is there


@pytest.mark.parametrize("v,group", [(5000, 8), (5003, 8), (640, 64), (999, None)])
def test_grouped_top_k_equals_lax_top_k_with_ties(v, group):
  k = 10
  rng = np.random.default_rng(v)
  # Few distinct values: many exact ties, across groups and with the tail; some -inf rows.
  scores = rng.integers(0, 40, size=(6, v)).astype(np.float32)
  scores[1, :] = -np.inf
  scores[1, [3, 4000 % v, v - 1]] = 1.0  # fewer finite items than k
  scores[2, rng.choice(v, v - 5, replace=False)] = -np.inf
  scores = jnp.asarray(scores)
  want_vals, want_ids = jax.lax.top_k(scores, k)
  vals, ids = jax.jit(functools.partial(lc.grouped_top_k, k=k, group=group))(scores)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(vals, want_vals)
  # Continuous scores, and a batch of rows with a leading axis of 2.
  scores = jax.random.normal(jax.random.key(v), (2, 3, v))
  np.testing.assert_array_equal(lc.grouped_top_k(scores, k, group)[1], jax.lax.top_k(scores, k)[1])


@pytest.mark.parametrize("v,group,valid", [
    (5000, 8, (1, 4990)),      # padding row 0 and ten filler rows, in part of a group
    (5003, 8, (1, 4001)),      # the invalid ids span many whole groups and the tail
    (640, 8, (1, 6)),          # fewer valid ids than k: -inf ids fill the list, in id order
    (999, None, (1, 998)),     # short row: the plain lax.top_k path
    (5000, 8, (0, 5000))])     # nothing masked
def test_grouped_top_k_valid_range_equals_masked_lax_top_k(v, group, valid):
  k = 10
  rng = np.random.default_rng(v + valid[1])
  scores = rng.integers(0, 40, size=(4, v)).astype(np.float32)
  scores[:, 0] = 1e9            # an invalid id that would otherwise always win
  scores[:, valid[1]:] = 1e9
  scores[1, :] = -np.inf        # and a row of -inf everywhere
  ids = np.arange(v)
  want_vals, want_ids = jax.lax.top_k(
      jnp.where((ids >= valid[0]) & (ids < valid[1]), scores, -jnp.inf), k)
  vals, got_ids = jax.jit(functools.partial(lc.grouped_top_k, k=k, group=group,
                                            valid=valid))(jnp.asarray(scores))
  np.testing.assert_array_equal(got_ids, want_ids)
  np.testing.assert_array_equal(vals, want_vals)


def test_item_proposal_and_sampler():
  counts = np.array([0, 50, 0, 10, 5, 1])  # row 0 is padding; item 2 never seen
  cdf, log_q = lc.item_proposal(counts, power=1.0, n_rows=8)
  q = np.exp(log_q.astype(np.float64))
  assert cdf.shape == log_q.shape == (8,) and np.all(np.diff(cdf) >= 0)
  assert q[0] == 0 and q[6] == 0 and q[7] == 0  # padding and filler rows
  assert q.sum() == pytest.approx(1.0, abs=1e-6)
  np.testing.assert_allclose(q[1:6], (counts[1:] + 1) / (counts[1:] + 1).sum(), rtol=1e-5)
  draws = np.asarray(lc.sample_items(jax.random.key(0), jnp.asarray(cdf), 200_000))
  assert draws.min() >= 1 and draws.max() <= 5
  np.testing.assert_allclose(np.bincount(draws, minlength=8) / len(draws), q, atol=4e-3)
  _, log_u = lc.item_proposal(counts, power=0.0, n_rows=8)
  np.testing.assert_allclose(np.exp(log_u[1:6]), 0.2, rtol=1e-5)


def _sampled_setup(seed=6, b=8, d=16, v=256, n_items=200):
  hidden, table, targets = _problem(seed=seed, b=b, d=d, v=v, n_items=n_items)
  zipf = np.zeros(n_items + 1)
  zipf[1:] = 1e4 / np.arange(1, n_items + 1) ** 1.2  # a strongly skewed proposal
  cdf, log_q = lc.item_proposal(zipf, power=1.0, n_rows=v)
  return hidden, table * 0.5, targets, jnp.asarray(cdf), jnp.asarray(log_q)


def test_sampled_softmax_approaches_full_ce_as_negatives_grow():
  hidden, table, targets, cdf, log_q = _sampled_setup()
  full = float(jnp.mean(_plain_ce(hidden, table, targets, 200)))
  keys = jax.random.split(jax.random.key(0), 64)

  def mean_loss(n, correct=True):
    fn = lambda key: jnp.mean(lc.sampled_softmax_loss(  # noqa: E731
        hidden, table, targets, key, num_negatives=n, item_log_q=log_q, sampling_cdf=cdf,
        correct_log_q=correct))
    return float(jnp.mean(jax.jit(jax.vmap(fn))(keys)))

  gaps = [full - mean_loss(n) for n in (8, 64, 512, 4096)]
  # From below (Jensen), and closer with every step.
  assert all(g > -0.02 for g in gaps), gaps
  assert gaps[0] > gaps[1] > gaps[2] > gaps[3], gaps
  assert abs(gaps[-1]) < 0.05, gaps
  # Without the logQ correction the proposal's skew biases the loss, however many negatives.
  assert abs(full - mean_loss(4096, correct=False)) > 10 * abs(gaps[-1])


def test_sampled_softmax_gradient_points_like_the_full_gradient():
  hidden, table, targets, cdf, log_q = _sampled_setup(seed=7)
  full = jax.grad(lambda h: jnp.sum(_plain_ce(h, table, targets, 200)))(hidden).ravel()

  def mean_grad(n, correct):
    grad = jax.grad(lambda h, key: jnp.sum(lc.sampled_softmax_loss(
        h, table, targets, key, num_negatives=n, item_log_q=log_q, sampling_cdf=cdf,
        correct_log_q=correct)))
    keys = jax.random.split(jax.random.key(1), 32)
    return jnp.mean(jax.vmap(grad, in_axes=(None, 0))(hidden, keys), axis=0).ravel()

  cosine = lambda a, b: float(a @ b / jnp.linalg.norm(a) / jnp.linalg.norm(b))  # noqa: E731
  assert cosine(mean_grad(1024, True), full) > 0.99
  assert cosine(mean_grad(1024, True), full) > cosine(mean_grad(1024, False), full)
  assert cosine(mean_grad(1024, True), full) > cosine(mean_grad(16, True), full)


def test_sampled_softmax_removes_accidental_hits():
  hidden, table, targets, _, _ = _sampled_setup(seed=8)
  # A proposal with all its mass on the first target: every draw is an accidental hit of row 0.
  log_q = jnp.full((table.shape[0],), -jnp.inf).at[targets[0]].set(0.0)
  loss = lc.sampled_softmax_loss(hidden, table, targets, jax.random.key(0), num_negatives=32,
                                 item_log_q=log_q)
  assert float(loss[0]) == pytest.approx(0.0, abs=1e-6)  # only the target is left
  kept = lc.sampled_softmax_loss(hidden, table, targets, jax.random.key(0), num_negatives=32,
                                 item_log_q=log_q, remove_accidental_hits=False)
  assert float(kept[0]) > 0.5


def test_synthetic_powerlaw():
  ds = lc.synthetic_powerlaw(n_users=500, n_items=2000, n_interactions=20_000, alpha=1.1, seed=3)
  assert isinstance(ds, data_lib.SequenceDataset)
  assert (ds.n_users, ds.n_items, ds.n_interactions) == (500, 2000, 20_000)
  assert ds.items.dtype == np.int32 and ds.offsets.dtype == np.int64
  assert ds.lengths.min() >= 3 and ds.lengths.sum() == 20_000
  assert ds.item_ids[0] == "[PAD]" and ds.item_ids[7] == "7" and ds.user_ids[0] == "1"
  counts = np.sort(np.bincount(ds.items, minlength=2001)[1:])[::-1]
  assert counts[:20].sum() > 0.3 * ds.n_interactions  # the top 1% of items: Zipf's head
  # Popular items are spread over the id range (every shard of a sharded table gets some).
  top = np.argsort(np.bincount(ds.items, minlength=2001))[-50:]
  assert np.ptp(top) > 1000
  flat = lc.synthetic_powerlaw(500, 2000, 20_000, alpha=0.0, seed=3)
  assert np.bincount(flat.items, minlength=2001)[1:].max() < 40  # uniform: ~10 per item
  again = lc.synthetic_powerlaw(500, 2000, 20_000, alpha=1.1, seed=3, chunk=777)
  np.testing.assert_array_equal(again.offsets, ds.offsets)  # the chunk size changes nothing
  np.testing.assert_array_equal(again.items, ds.items)
  split = data_lib.leave_one_out(ds)
  assert split.n_eval == 500
  with pytest.raises(ValueError, match="min_length"):
    lc.synthetic_powerlaw(500, 2000, 1000)


def _synthetic_config(softmax, **mesh_shape):
  c = base_config()
  c.data.max_len = 8
  c.model.hidden = 16
  c.model.n_heads = 4  # heads are sharded over "tensor" too
  c.model.inner = 32
  c.model.n_layers = 1
  c.model.vocab_pad_multiple = 64
  c.model.softmax = softmax
  c.model.softmax_chunk = 48  # 512 rows / tensor=4 = 128 per shard: 48 + 48 + a clamped 32
  c.model.num_negatives = 64
  c.train.batch_size = 32
  c.train.num_steps = 3
  c.train.progress = False
  c.eval.batch_size = 64
  c.mesh.shape = mesh_shape or {"data": 2, "tensor": 4}
  return c


@pytest.fixture(scope="module")
def synthetic_split():
  return data_lib.leave_one_out(lc.synthetic_powerlaw(200, 500, 3000, alpha=1.0, seed=0))


def test_sharded_train_steps_equal_full_softmax_steps(synthetic_split):
  """Same init, same batches, same dropout: the sharded softmax trains exactly like "full"."""
  exps = {kind: loop.build_experiment(_synthetic_config(kind), split=synthetic_split)
          for kind in ("full", "sharded")}
  states = {kind: e.state for kind, e in exps.items()}
  for _ in range(2):
    metrics = {}
    for kind, e in exps.items():
      states[kind], metrics[kind] = e.train_step(states[kind], next(e.iterator))
    assert float(metrics["sharded"]["loss_sum"]) == pytest.approx(
        float(metrics["full"]["loss_sum"]), rel=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(states["full"].params)),
                  jax.tree.leaves(jax.device_get(states["sharded"].params))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("exclude_seen", [False, True])
def test_blocked_evaluation_equals_dense_evaluation(synthetic_split, exclude_seen):
  """softmax != "full" switches the evaluator to blocked, item-sharded ranks: same metrics."""
  results = {}
  for kind in ("full", "sharded"):
    c = _synthetic_config(kind)
    c.model.softmax_chunk = 96  # several blocks per item shard
    c.eval.exclude_seen = exclude_seen
    e = loop.build_experiment(c, split=synthetic_split)
    results[kind] = e.evaluate(e.state.params, "valid")
  assert set(results["full"]) == set(results["sharded"])
  for key, want in results["full"].items():
    assert results["sharded"][key] == pytest.approx(want, abs=1e-6), key
  assert results["full"]["HR@20"] > 0  # the comparison is not between two empty results


def test_sampled_task_holds_the_proposal(synthetic_split):
  c = _synthetic_config("sampled")
  model, model_cfg = models.build_model(c.model, n_items=500, max_len=8)
  task = tasks.make_task(c, synthetic_split, model)
  q = np.exp(np.asarray(task.consts["sampling_log_q"], np.float64))
  assert q.shape == (model_cfg.table_rows,) and task.consts_axes["sampling_log_q"] == (None,)
  assert q[0] == 0 and np.all(q[501:] == 0) and q.sum() == pytest.approx(1.0, abs=1e-5)
  # Counted from training targets only, smoothed by one: a popular item outweighs a rare one.
  counts = np.bincount(synthetic_split.dataset.items[synthetic_split.train_targets],
                       minlength=501)
  hi, lo = int(np.argmax(counts[1:])) + 1, int(np.argmin(counts[1:])) + 1
  assert q[hi] / q[lo] == pytest.approx(((counts[hi] + 1) / (counts[lo] + 1)) ** 0.75, rel=1e-4)


@pytest.mark.parametrize("softmax", ["sharded", "sampled"])
def test_ml100k_tiny_trains_with_large_catalogue_softmax(softmax, tmp_path):
  pytest.importorskip("recbole", reason="ml-100k ships in the recbole wheel")
  from configs.sasrec import ml100k  # pylint: disable=g-import-not-at-top
  c = ml100k.get_config("tiny")
  c.model.softmax = softmax
  c.model.n_layers = 1
  c.model.num_negatives = 256
  c.model.softmax_chunk = 128
  c.mesh.shape = {"data": 4, "tensor": 2}  # tensor=2 divides the tiny config's 2 heads
  c.train.num_steps = 2
  c.train.eval_every_steps = 2
  c.train.log_every_steps = 1
  c.checkpoint.async_save = False
  results = loop.train_and_evaluate(c, str(tmp_path))
  assert results["steps"] == 2 and 0.0 <= results["test"]["NDCG@10"] <= 1.0
  with open(tmp_path / "metrics.jsonl") as f:
    losses = [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]
  # About log(1682) = 7.4 at init (the sampled loss estimates the same quantity).
  assert len(losses) == 2 and all(np.isfinite(losses)) and all(0 < x < 8 for x in losses)


def test_config_validation_of_the_softmax_switch():
  c = base_config()
  validate_config(c)
  for key, value, match in (("softmax", "approx", "allowed"), ("num_negatives", 0, "positive"),
                            ("sampling_power", -1.0, ">= 0"), ("softmax_chunk", 0, "positive")):
    bad = base_config()
    bad.model[key] = value
    with pytest.raises(ValueError, match=f"config.model.{key}.*{match}"):
      validate_config(bad)
  bad = base_config()
  bad.model.softmax, bad.model.loss_positions = "sharded", "all"
  with pytest.raises(ValueError, match="loss_positions='last' only"):
    validate_config(bad)
  bad = base_config()
  bad.model.softmax, bad.task.name = "sampled", "cloze"
  with pytest.raises(ValueError, match="'next_item' only"):
    validate_config(bad)
  old = base_config()
  del old.model["softmax"]  # a config.json written before the switch existed
  validate_config(old)


def test_benchmark_script_runs_at_a_tiny_size(tmp_path):
  out = tmp_path / "bench.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "large_catalog_benchmark.py"),
       "--n_items=3000", "--n_users=300", "--n_interactions=6000", "--batch_size=32",
       "--hidden=16", "--n_layers=1", "--max_len=8", "--steps=2", "--warmup=1",
       "--eval_users=64", "--eval_batch_size=32", "--eval_repeats=1",
       "--softmax=sharded,sampled", "--num_negatives=64", "--chunk_size=512",
       "--mesh=data=1,tensor=2", "--isolate=false", f"--out={out}"],
      capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    report = json.load(f)
  assert set(report["runs"]) == {"sharded", "sampled"}
  for run in report["runs"].values():
    assert run["step_seconds_median"] > 0 and run["train_examples_per_second"] > 0
    assert run["peak_rss_mib"] > 0 and run["train_compile_seconds"] > 0
  assert report["top_k"]["eval_users_per_second"] > 0
  ranks = report["ranks"]
  assert ranks["eval_users"] == 64 and ranks["eval_users_per_second"] > 0
  # An untrained model over 3,000 items: HR@20 near 20/3000, certainly below 0.5.
  assert 0.0 <= ranks["untrained_metrics"]["HR@20"] < 0.5
