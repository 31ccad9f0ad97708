"""SASRec numerics against an independent numpy forward pass, plus dropout and FLOP accounting."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqrec_jax.models import layers
from seqrec_jax.models.sasrec import SASRec, SASRecConfig


def _ln(x, scale, bias, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def _gelu(x):
  erf = np.vectorize(math.erf)
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def numpy_sasrec(params, inputs, cfg):
  """RecBole-style SASRec forward in float64 numpy (post-LN, causal + padding key mask)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  b, l = inputs.shape
  x = p["item_embedding"]["embedding"][inputs] + p["position_embedding"][None]
  x = _ln(x, p["input_norm"]["LayerNorm_0"]["scale"], p["input_norm"]["LayerNorm_0"]["bias"],
          cfg.ln_eps)
  allowed = np.tril(np.ones((l, l), bool))[None] & (inputs > 0)[:, None, :]  # [B, L, L]
  for i in range(cfg.n_layers):
    blk = p[f"block_{i}"]
    att = blk["attention"]
    q = np.einsum("bld,dhk->bhlk", x, att["query_kernel"]) + att["query_bias"][None, :, None]
    k = np.einsum("bld,dhk->bhlk", x, att["key_kernel"]) + att["key_bias"][None, :, None]
    v = np.einsum("bld,dhk->bhlk", x, att["value_kernel"]) + att["value_bias"][None, :, None]
    s = np.einsum("bhlk,bhmk->bhlm", q, k) / math.sqrt(q.shape[-1])
    s = np.where(allowed[:, None], s, -1e9)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    o = np.einsum("bhlm,bhmk->blhk", s, v)
    o = np.einsum("blhk,hkd->bld", o, att["out_kernel"]) + att["out_bias"]
    h = _ln(x + o, blk["attention_norm"]["LayerNorm_0"]["scale"],
            blk["attention_norm"]["LayerNorm_0"]["bias"], cfg.ln_eps)
    f = _gelu(h @ blk["ffn_in"]["kernel"] + blk["ffn_in"]["bias"])
    f = f @ blk["ffn_out"]["kernel"] + blk["ffn_out"]["bias"]
    x = _ln(h + f, blk["ffn_norm"]["LayerNorm_0"]["scale"], blk["ffn_norm"]["LayerNorm_0"]["bias"],
            cfg.ln_eps)
  return x


@pytest.fixture(scope="module")
def model_and_params():
  cfg = SASRecConfig(n_items=50, max_len=12, hidden=32, n_layers=2, n_heads=4, inner=64,
                     vocab_pad_multiple=8, init_std=0.2)
  model = SASRec(cfg)
  params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x,
                        model.init(jax.random.key(0), jnp.ones((1, 12), jnp.int32))["params"],
                        is_leaf=lambda x: hasattr(x, "unbox"))
  # Non-trivial LayerNorm parameters so their use is tested too.
  params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), params)
  rng = np.random.default_rng(0)
  inputs = rng.integers(1, 51, size=(6, 12)).astype(np.int32)
  inputs[0, :7] = 0  # left padding
  inputs[1, :11] = 0  # a single item
  return cfg, model, params, inputs


def test_encoder_matches_numpy_reference(model_and_params):
  cfg, model, params, inputs = model_and_params
  got = model.apply({"params": params}, jnp.asarray(inputs), train=False, method=SASRec.encode)
  want = numpy_sasrec(params, inputs, cfg)
  # Padding query rows attend uniformly (all keys masked) in both; compare every position.
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


def test_last_only_equals_full_last_position(model_and_params):
  cfg, model, params, inputs = model_and_params
  full = model.apply({"params": params}, jnp.asarray(inputs), train=False, method=SASRec.encode)
  vec = model.apply({"params": params}, jnp.asarray(inputs), train=False)
  np.testing.assert_allclose(np.asarray(vec), np.asarray(full[:, -1]), rtol=1e-5, atol=1e-5)


def test_scores_are_tied_and_mask_non_items(model_and_params):
  cfg, model, params, inputs = model_and_params
  vec = model.apply({"params": params}, jnp.asarray(inputs), train=False)
  scores = np.asarray(model.apply({"params": params}, vec, method=SASRec.score))
  assert scores.shape == (6, cfg.table_rows) and cfg.table_rows == 56
  table = np.asarray(params["item_embedding"]["embedding"])
  np.testing.assert_allclose(scores[:, 1:51], np.asarray(vec) @ table[1:51].T, rtol=1e-5,
                             atol=1e-5)
  assert np.all(np.isneginf(scores[:, 0])) and np.all(np.isneginf(scores[:, 51:]))


@pytest.mark.parametrize("rate", [0.5, 0.2])
def test_dropout_rate_and_scaling(rate):
  x = jnp.ones((64, 40, 32))
  y = layers.Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
  y = np.asarray(y)
  kept = y != 0
  threshold = round(rate * 256)
  keep_prob = (256 - threshold) / 256
  assert abs(kept.mean() - keep_prob) < 0.01
  np.testing.assert_allclose(y[kept], 1 / keep_prob, rtol=1e-6)
  # Odd trailing size takes the flat path.
  z = layers.Dropout(rate).apply({}, jnp.ones((7, 5)), deterministic=False,
                                 rngs={"dropout": jax.random.key(4)})
  assert z.shape == (7, 5)
  same = layers.Dropout(rate).apply({}, x, deterministic=True)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(x))


def test_flops_formula_against_xla_cost_analysis():
  """Our analytic model FLOPs are within 10% of XLA's count of the same forward computation."""
  cfg = SASRecConfig(n_items=2000, max_len=20, hidden=64, n_layers=2, n_heads=2, inner=256,
                     vocab_pad_multiple=1, dropout=0.0, attn_dropout=0.0)
  model = SASRec(cfg)
  params = model.init(jax.random.key(0), jnp.ones((1, 20), jnp.int32))["params"]
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, model.apply({"params": p}, x),
                                         method=SASRec.score))
  cost = fwd.lower(params, jnp.ones((8, 20), jnp.int32)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla = float(cost["flops"]) / 8
  ours = cfg.train_flops_per_sequence("last") / 3
  assert ours == pytest.approx(xla, rel=0.1)


def test_gru4rec_ignores_left_padding_and_matches_numpy():
  """GRU4Rec: the representation of a left-padded sequence equals that of the bare sequence,
  and one GRU layer matches a numpy recurrence."""
  from seqrec_jax.models.gru4rec import GRU4Rec, GRU4RecConfig  # pylint: disable=g-import-not-at-top
  cfg = GRU4RecConfig(n_items=30, max_len=8, hidden=16, gru_hidden=12, n_layers=1,
                      vocab_pad_multiple=8, init_std=0.3)
  model = GRU4Rec(cfg)
  params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x,
                        model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"],
                        is_leaf=lambda x: hasattr(x, "unbox"))
  seq = np.array([[0, 0, 0, 5, 9, 2, 7, 3]], np.int32)
  short = GRU4Rec(dataclasses.replace(cfg, max_len=5))
  a = model.apply({"params": params}, jnp.asarray(seq))
  b = short.apply({"params": params}, jnp.asarray(seq[:, 3:]))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  # numpy GRU (flax GRUCell equations: r, z gates; n = tanh(W_in x + b_in + r * (W_hn h + b_hn)))
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  cell = p["gru_0"]["ScanGRUCell_0"] if "ScanGRUCell_0" in p["gru_0"] else p["gru_0"][
      next(iter(p["gru_0"]))]
  sig = lambda v: 1 / (1 + np.exp(-v))
  h = np.zeros(12)
  for item in seq[0, 3:]:
    x = p["item_embedding"]["embedding"][item]
    r = sig(x @ cell["ir"]["kernel"] + cell["ir"]["bias"] + h @ cell["hr"]["kernel"])
    z = sig(x @ cell["iz"]["kernel"] + cell["iz"]["bias"] + h @ cell["hz"]["kernel"])
    n = np.tanh(x @ cell["in"]["kernel"] + cell["in"]["bias"] +
                r * (h @ cell["hn"]["kernel"] + cell["hn"]["bias"]))
    h = (1 - z) * n + z * h
  want = h @ p["out"]["kernel"] + p["out"]["bias"]
  np.testing.assert_allclose(np.asarray(a)[0], want, rtol=1e-4, atol=1e-5)
