"""BERT4Rec: bidirectional, padding-invariant encoder; [MASK]-appended next-item vector; the
cloze task's loss; a short end-to-end run that learns; the config file."""

import importlib.util
import math
import os

import jax
import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from seqrec_jax import cloze, loop, models, tasks
from seqrec_jax.models.bert4rec import BERT4Rec, BERT4RecConfig
from seqrec_jax.models.sasrec import SASRec, SASRecConfig
from tests.test_loop import _write_pairs, small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_ITEMS, L = 20, 6


def _model(**kw):
  cfg = BERT4RecConfig(n_items=N_ITEMS, max_len=L, hidden=16, n_layers=2, n_heads=2, inner=32,
                       vocab_pad_multiple=8, **kw)
  model = BERT4Rec(cfg)
  params = model.init(jax.random.key(0), jnp.ones((1, L), jnp.int32))["params"]
  return model, nn.meta.unbox(params)


def test_config_rows_and_mask_id():
  cfg = BERT4RecConfig(n_items=N_ITEMS, max_len=L, vocab_pad_multiple=8)
  assert cfg.mask_id == 21 and cfg.table_rows == 24  # 22 rows (pad, 20 items, mask) -> 24
  assert BERT4RecConfig(n_items=22, max_len=L, vocab_pad_multiple=8).table_rows == 24
  assert BERT4RecConfig(n_items=23, max_len=L, vocab_pad_multiple=8).table_rows == 32
  assert cfg.train_flops_per_sequence() > cfg.train_flops_per_sequence("last") > 0
  # The output layer: 3 x 2 D rows per scored position; the cloze task scores the masked ones.
  f = cfg.train_flops_per_sequence
  row = 3 * 2 * cfg.hidden * cfg.table_rows
  assert f("all") - f("last") == pytest.approx(row * (L - 1))
  assert f("masked") - f("last") == pytest.approx(row * cfg.mask_prob * (L - 1))
  with pytest.raises(ValueError, match="divisible"):
    BERT4RecConfig(n_items=5, max_len=L, hidden=15, n_heads=2)


def test_attention_is_bidirectional_unlike_sasrec():
  model, params = _model()
  a = jnp.array([[0, 3, 4, 5, 6, 7]], jnp.int32)
  b = a.at[0, 4].set(12)  # change a LATER item
  ea = model.apply({"params": params}, a, train=False, method=BERT4Rec.encode)
  eb = model.apply({"params": params}, b, train=False, method=BERT4Rec.encode)
  assert float(jnp.abs(ea[0, 2] - eb[0, 2]).max()) > 1e-4  # an earlier position sees it
  scfg = SASRecConfig(n_items=N_ITEMS, max_len=L, hidden=16, n_layers=2, n_heads=2, inner=32,
                      vocab_pad_multiple=8)
  sas = SASRec(scfg)
  sp = sas.init(jax.random.key(0), a)["params"]
  sa = sas.apply({"params": sp}, a, train=False, method=SASRec.encode)
  sb = sas.apply({"params": sp}, b, train=False, method=SASRec.encode)
  assert float(jnp.abs(sa[0, 2] - sb[0, 2]).max()) < 1e-6  # causal: it does not


def test_padding_invariant_and_call_is_masked_last_position():
  model, params = _model()
  x = jnp.array([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]], jnp.int32)
  short = jnp.array([[0, 3, 4, 5, 6], [2, 3, 4, 5, 6]], jnp.int32)  # [B, 5]
  v = model.apply({"params": params}, x, train=False)  # [B, D]
  assert v.shape == (2, 16)
  # Prepending padding (a longer, right-aligned window) changes nothing.
  longer = jnp.array([[0, 0, 0, 0, 3, 4, 5, 6]], jnp.int32)
  cfg8 = BERT4RecConfig(n_items=N_ITEMS, max_len=8, hidden=16, n_layers=2, n_heads=2, inner=32,
                        vocab_pad_multiple=8)
  p8 = dict(params, position_embedding=jnp.concatenate(
      [jnp.zeros((2, 16)), params["position_embedding"]]))
  v8 = BERT4Rec(cfg8).apply({"params": p8}, longer, train=False)
  assert jnp.allclose(v8[0], v[0], atol=1e-5)
  # __call__ == encode of (window without its oldest position, then [MASK]) at the last position.
  shifted = jnp.concatenate([x[:, 1:], jnp.full((2, 1), model.config.mask_id)], axis=1)
  enc = model.apply({"params": params}, shifted, train=False, method=BERT4Rec.encode)
  assert jnp.allclose(v, enc[:, -1], atol=1e-5)
  # The dropped oldest position: row 1's item 1 falls out, so it equals the short window's call.
  vs = model.apply({"params": params}, jnp.concatenate(
      [jnp.zeros((2, 1), jnp.int32), short], axis=1), train=False)
  assert jnp.allclose(vs[1], v[1], atol=1e-5)


def test_score_masks_padding_mask_and_filler_rows():
  model, params = _model()
  v = model.apply({"params": params}, jnp.array([[0, 0, 3, 4, 5, 6]], jnp.int32), train=False)
  s = model.apply({"params": params}, v, method=BERT4Rec.score)  # [1, 24]
  assert s.shape == (1, 24) and s.dtype == jnp.float32
  assert bool(jnp.isneginf(s[0, 0])) and bool(jnp.isneginf(s[0, N_ITEMS + 1]))  # pad, mask
  assert bool(jnp.all(jnp.isneginf(s[0, N_ITEMS + 1:])))  # mask + filler rows
  assert bool(jnp.all(jnp.isfinite(s[0, 1:N_ITEMS + 1])))


def _manual_loss(model, params, target_seq, weights, masked):
  """The cloze loss written out by hand for a given mask (deterministic forward)."""
  inputs = jnp.where(masked, model.config.mask_id, target_seq)
  logits = model.apply({"params": params}, model.apply(
      {"params": params}, inputs, train=False, method=BERT4Rec.encode), method=BERT4Rec.score)
  total, count = 0.0, 0.0
  for b in range(target_seq.shape[0]):
    for i in range(target_seq.shape[1]):
      if bool(masked[b, i]) and float(weights[b]) > 0:
        lp = jax.nn.log_softmax(logits[b, i])
        total += -float(lp[int(target_seq[b, i])]) * float(weights[b])
        count += float(weights[b])
  return total, count


def test_cloze_loss_on_a_hand_batch():
  model, params = _model(dropout=0.0, attn_dropout=0.0)
  target_seq = jnp.array([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 7, 8]], jnp.int32)
  weights = jnp.array([1.0, 1.0, 0.0])
  batch = {"target_seq": target_seq, "weights": weights}
  rng = jax.random.key(3)
  # mask_prob = 0: only the last position is masked, so this is next-item CE at the [MASK] there.
  loss, wsum, masked = cloze.cloze_loss(params, batch, rng, model=model, mask_id=21, mask_prob=0.0)
  assert masked.tolist() == [[False] * 5 + [True]] * 3
  assert float(wsum) == 2.0  # the weight-0 row counts for nothing
  ref, count = _manual_loss(model, params, target_seq, weights, masked)
  assert count == 2.0 and float(loss) == pytest.approx(ref, rel=1e-5)
  # mask_prob = 1: every non-padding position is masked, padding never is.
  loss1, wsum1, masked1 = cloze.cloze_loss(params, batch, rng, model=model, mask_id=21,
                                           mask_prob=1.0)
  assert (masked1 == (target_seq > 0)).all() and float(wsum1) == 4 + 6
  ref1, _ = _manual_loss(model, params, target_seq, weights, masked1)
  assert float(loss1) == pytest.approx(ref1, rel=1e-5)
  # A random mask: within the non-padding positions, last one always in, and the loss sums
  # exactly over it.
  loss5, wsum5, masked5 = cloze.cloze_loss(params, batch, rng, model=model, mask_id=21,
                                           mask_prob=0.5)
  assert not (masked5 & (target_seq == 0)).any() and masked5[:, -1].all()
  ref5, count5 = _manual_loss(model, params, target_seq, weights, masked5)
  assert float(wsum5) == count5 and float(loss5) == pytest.approx(ref5, rel=1e-5)


def test_budgeted_scoring_equals_dense_scoring_in_loss_and_gradient():
  """Scoring only the masked rows (the default budget), falling back to dense scoring when a
  batch has more masked rows than the budget, and dense scoring give one loss and gradient."""
  model, params = _model(dropout=0.0, attn_dropout=0.0)
  target_seq = jax.random.randint(jax.random.key(1), (16, L), 1, N_ITEMS + 1)
  target_seq = target_seq * (jnp.arange(L)[None] >= jnp.arange(16)[:, None] % 4)  # padding
  weights = jnp.ones(16).at[3].set(0.0)
  batch = {"target_seq": target_seq, "weights": weights}
  # A key that masks the very first position, which the gather's fill rows point at: fill rows
  # that were not zero-weighted would then count it again.
  rng = next(k for k in (jax.random.key(s) for s in range(100))
             if cloze.cloze_mask(target_seq, jax.random.split(k)[0], 0.3)[0, 0])

  def run(budget, mode="cond"):
    def f(p):
      loss, wsum, masked = cloze.cloze_loss(p, batch, rng, model=model, mask_id=21,
                                            mask_prob=0.3, budget=budget, mode=mode)
      return loss, (wsum, masked)
    (loss, (wsum, masked)), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return float(loss), float(wsum), masked, grad

  dense = run(16 * L)
  n_scored = int(dense[1])
  assert int(cloze.masked_row_count(batch, rng, 0.3)) == n_scored
  assert 16 < n_scored < 16 * L // 2
  cases = [(None, "cond"), (n_scored, "cond"), (n_scored - 1, "cond"), (4, "cond"),
           (n_scored, "gathered"), (4, "dense"), (None, "dense")]
  for budget, mode in cases:  # default; exactly enough; too few (dense); the modes themselves
    loss, wsum, masked, grad = run(budget, mode)
    assert (masked == dense[2]).all() and wsum == dense[1]
    assert loss == pytest.approx(dense[0], rel=1e-5), budget
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(dense[3])):
      assert jnp.allclose(a, b, rtol=1e-4, atol=1e-7), budget
  ref, _ = _manual_loss(model, params, target_seq, weights, dense[2])
  assert dense[0] == pytest.approx(ref, rel=1e-5)
  # The default budget: 4 standard deviations above the mean of full-length sequences.
  assert cloze.scoring_budget(256, 20, 0.2) == 1344 and cloze.scoring_budget(256, 20, 1.0) == 5120
  assert cloze.scoring_budget(16, L, 0.3) < 16 * L
  with pytest.raises(ValueError, match="unknown mode 'sparse'"):
    cloze.cloze_loss(params, batch, rng, model=model, mask_id=21, mask_prob=0.3, mode="sparse")


def test_planned_budget_matches_full_windows_and_simulated_batches():
  """The data-planned budget: the full-window budget when every window is full; for windows of
  mixed lengths, the mean + 4 std of batch totals drawn like the loader's (without replacement,
  Bernoulli masks), well under the full-window budget and never exceeded in 3,000 draws."""
  assert cloze.planned_budget([20] * 1000, 256, 20, 0.2) == cloze.scoring_budget(256, 20, 0.2)
  assert cloze.planned_budget([30] * 10, 16, 20, 0.2) == cloze.scoring_budget(16, 20, 0.2)
  rng = np.random.default_rng(0)
  spans = np.minimum(1 + rng.geometric(0.12, size=20000), 20)  # short histories dominate
  b, p = 256, 0.2
  budget = cloze.planned_budget(spans, b, 20, p)
  totals = np.array([b + rng.binomial(spans[rng.choice(len(spans), b, replace=False)] - 1,
                                      p).sum() for _ in range(3000)])
  assert totals.max() <= budget < 0.8 * cloze.scoring_budget(b, 20, p)
  assert abs(budget - (totals.mean() + 4 * totals.std())) <= 12, (budget, totals.mean(),
                                                                  totals.std())
  with pytest.raises(ValueError, match="windows of >= 1 item"):
    cloze.planned_budget([3, 0], 8, 20, p)


def test_cloze_train_step_picks_its_scoring_outside_the_grad(tmp_path):
  """The cloze task plans its budget from the training windows, and the train step picks the
  gathered loss when the batch's masked rows fit it, dense scoring when they do not (flagged in
  `cloze_overflow`): one step from the same state gives the same parameters either way, dropout
  on (the dense loss itself is checked by hand above)."""
  c = _cloze_config(_write_pairs(str(tmp_path / "toy.txt")))
  got = {}
  for case in ("planned", "overflow"):
    exp = loop.build_experiment(c, workdir=str(tmp_path / case))
    host = next(exp.iterator)
    b, length = host["target_seq"].shape
    assert exp.task.scoring_rows(b) < cloze.scoring_budget(b, length, 0.2) < b * length
    if case == "overflow":
      exp.task._budgets[b] = 8  # pylint: disable=protected-access
    index, losses = exp.task.select_loss(host, jax.random.key(0))
    assert len(losses) == 2 and int(index) == (case == "overflow")
    state, metrics = exp.train_step(exp.state, host)
    got[case] = (jax.device_get(state.params), {k: float(v) for k, v in metrics.items()})
  assert got["planned"][1]["cloze_overflow"] == 0.0 and got["overflow"][1]["cloze_overflow"] == 1.0
  assert got["planned"][1]["loss_sum"] == pytest.approx(got["overflow"][1]["loss_sum"], rel=1e-5)
  for a, b in zip(jax.tree.leaves(got["planned"][0]), jax.tree.leaves(got["overflow"][0])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert exp.task.select_loss(host) is None  # no key, no choice (the loss's own lax.cond)


def _cloze_config(path):
  c = small_config(path)
  c.task.name = "cloze"
  m = ml_collections.ConfigDict()
  m.name = "bert4rec"
  m.hidden, m.n_heads, m.inner, m.n_layers = 16, 2, 32, 1
  m.dropout = m.attn_dropout = 0.1
  m.vocab_pad_multiple = 8
  m.mask_prob = 0.2
  m.loss_positions = "last"
  c.model = m
  return c


def test_task_registry_and_metrics(tmp_path):
  c = _cloze_config(_write_pairs(str(tmp_path / "toy.txt")))
  model, _ = models.build_model(c.model, n_items=N_ITEMS, max_len=8)
  task = tasks.make_task(c, None, model)
  assert isinstance(task, cloze.ClozeTask) and task.mask_id == N_ITEMS + 1
  params = task.init_params(jax.random.key(0))
  batch = {"target_seq": jnp.array([[0, 0, 0, 1, 2, 3, 4, 5]] * 4, jnp.int32),
           "weights": jnp.ones(4)}
  loss_sum, weight_sum, extra = task.loss(params, batch, {}, jax.random.key(1))
  assert float(weight_sum) >= 4 and 0.2 <= float(extra["masked_fraction"]) <= 1.0
  assert float(loss_sum) / float(weight_sum) == pytest.approx(math.log(N_ITEMS), rel=0.2)


def test_cloze_training_learns(tmp_path):
  c = _cloze_config(_write_pairs(str(tmp_path / "toy.txt")))
  c.train.num_steps = 120
  c.train.eval_every_steps = 60
  c.optim.lr = 3e-3
  results = loop.train_and_evaluate(c, str(tmp_path / "run"))
  # Chance HR@10 is 10/40; the ring walk is learnable.
  assert results["test"]["HR@10"] > 0.45, results["test"]


def test_config_file_loads_tiny():
  path = os.path.join(ROOT, "configs", "bert4rec", "ml100k.py")
  spec = importlib.util.spec_from_file_location("bert4rec_cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("tiny")
  assert c.task.name == "cloze" and c.model.name == "bert4rec" and c.train.num_steps == 120
  model, cfg = models.build_model(c.model, n_items=1682, max_len=c.data.max_len)
  assert isinstance(model, BERT4Rec) and cfg.mask_prob == 0.2 and cfg.table_rows == 1728
