"""CALRec decoder: numerics against an independent numpy forward, causality, layer scanning and
rematerialisation, the KV cache, parameter counts and logical partitioning."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calrec_jax.models import decoder as dec
from seqrec_jax import sharding


def _cfg(**kw):
  return dec.preset("tiny", vocab_size=40, max_len=16, init_std=0.3, **kw)


def _apply(model, variables, *args, **kwargs):
  """model.apply under jit (op-by-op dispatch is slow on CPU); kwargs are closed over."""
  return jax.jit(lambda v, *a: model.apply(v, *a, **kwargs))(variables, *args)


def _init(cfg, seed=0):
  """Random parameters in numpy, shaped by an abstract `init` (no XLA compilation).

  Kernels ~ N(0, 0.3^2) so logits are O(1); norm scales are perturbed away from their init so
  that a mis-wired norm shows in the numbers.
  """
  model = dec.Decoder(cfg)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if "scale" in jax.tree_util.keystr(path):
      base = 0.0 if cfg.norm_offset else 1.0
      return (base + 0.3 * rng.standard_normal(leaf.shape)).astype(np.float32)
    return (0.3 * rng.standard_normal(leaf.shape)).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(abstract)["params"])
  return model, params, abstract


# ----------------------------------------------------------------------------------------------
# Independent float64 numpy reference: RoPE as complex rotation of (x_i, x_{i + K/2}) pairs,
# attention with kv heads repeated per query group (HF's repeat_kv).


def _np_norm(x, w, cfg):
  if cfg.norm == "layer":
    x = x - x.mean(-1, keepdims=True)
  x = x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps)
  return x * ((1.0 + w) if cfg.norm_offset else w)


def _np_rope(x, positions, theta):
  """x: [B, L, N, K]; rotation of complex pairs (x_i + i x_{i+K/2}) by pos * theta^(-2i/K)."""
  half = x.shape[-1] // 2
  freq = theta ** (-np.arange(half) * 2.0 / x.shape[-1])
  z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * positions[:, :, None, None] * freq)
  return np.concatenate([z.real, z.imag], axis=-1)


def _np_act(x, kind):
  if kind == "silu":
    return x / (1.0 + np.exp(-x))
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def numpy_decoder(params, cfg, tokens, key_mask, positions):
  """Returns [B, L, V] logits of the decoder described in calrec_jax.models.decoder."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  b, l = tokens.shape
  x = p["embedding"][tokens]
  if cfg.embed_scale:
    x = x * math.sqrt(cfg.d_model)
  allowed = np.tril(np.ones((l, l), bool))[None] & key_mask[:, None, :]  # [B, Lq, Lk]
  group = cfg.n_heads // cfg.n_kv_heads
  for i in range(cfg.n_layers):
    blk = p["blocks"][f"layer_{i}"]
    att = blk["attention"]

    def attention(h):
      q = _np_rope(np.einsum("bld,dhk->blhk", h, att["query"]), positions, cfg.rope_theta)
      k = _np_rope(np.einsum("bld,dhk->blhk", h, att["key"]), positions, cfg.rope_theta)
      v = np.einsum("bld,dhk->blhk", h, att["value"])
      k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
      s = np.einsum("blhk,bmhk->bhlm", q, k) / math.sqrt(cfg.head_dim)
      s = np.where(allowed[:, None], s, -1e30)
      s = np.exp(s - s.max(-1, keepdims=True))
      s /= s.sum(-1, keepdims=True)
      return np.einsum("blhk,hkd->bld", np.einsum("bhlm,bmhk->blhk", s, v), att["out"])

    def mlp(h):
      m = blk["mlp"]
      return (_np_act(h @ m["gate"], cfg.mlp_activation) * (h @ m["up"])) @ m["down"]

    h = _np_norm(x, blk["attn_norm"]["scale"], cfg)
    if cfg.parallel_block:
      x = x + attention(h) + mlp(h)
    else:
      x = x + attention(h)
      x = x + mlp(_np_norm(x, blk["mlp_norm"]["scale"], cfg))
  x = _np_norm(x, p["final_norm"]["scale"], cfg)
  head = p["embedding"].T if cfg.tie_embeddings else p["lm_head"]
  return x @ head


VARIANTS = {
    "palm": dict(),
    "llama_gqa_untied": dict(parallel_block=False, n_kv_heads=2, tie_embeddings=False),
    "gemma_mha": dict(parallel_block=False, n_kv_heads=4, mlp_activation="gelu",
                      embed_scale=True, norm_offset=True, head_dim=8),
    "layernorm": dict(norm="layer", rope_theta=500.0),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_numpy_reference(variant):
  cfg = _cfg(**VARIANTS[variant])
  model, params, _ = _init(cfg)
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, cfg.vocab_size, (2, 6)).astype(np.int32)
  key_mask = np.ones((2, 6), bool)
  logits, hidden = _apply(model, {"params": params}, jnp.asarray(tokens))
  assert logits.shape == (2, 6, cfg.vocab_size) and logits.dtype == jnp.float32
  assert hidden.shape == (2, 6, cfg.d_model) and hidden.dtype == jnp.float32
  want = numpy_decoder(params, cfg, tokens, key_mask, np.tile(np.arange(6), (2, 1)))
  assert np.abs(want).max() > 0.5  # the comparison is not between near-zero numbers
  np.testing.assert_allclose(np.asarray(logits), want, atol=2e-4, rtol=1e-4)


def test_param_count_and_matmul_params():
  for kw in VARIANTS.values():
    cfg = _cfg(**kw)
    model = dec.Decoder(cfg)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    leaves = jax.tree.leaves(nn.meta.unbox(abstract)["params"])
    assert sum(x.size for x in leaves) == cfg.num_params()
    untied_extra = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    # matmul params = every 2-D+ weight, counting the output layer (tied or not) once
    assert sum(x.size for x in leaves if x.ndim >= 2) - untied_extra == cfg.matmul_params()
  cfg = _cfg()
  assert cfg.train_flops_per_token(16) == (
      6 * cfg.matmul_params() + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 16)
  one_b = dec.preset("1b", vocab_size=32000, max_len=512)
  assert one_b.num_params() == 1_013_483_520


def test_mqa_projection_shapes():
  cfg = _cfg()
  assert cfg.n_kv_heads == 1
  _, params, _ = _init(cfg)
  att = params["blocks"]["layer_0"]["attention"]
  assert att["query"].shape == (cfg.d_model, cfg.n_heads, cfg.head_dim)
  assert att["key"].shape == att["value"].shape == (cfg.d_model, 1, cfg.head_dim)
  assert att["out"].shape == (cfg.n_heads, cfg.head_dim, cfg.d_model)
  assert "mlp_norm" not in params["blocks"]["layer_0"]  # parallel block: one pre-norm


def test_causal():
  cfg = _cfg()
  model, params, _ = _init(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 8)), jnp.int32)
  changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % 40)
  a, _ = _apply(model, {"params": params}, tokens)
  b, _ = _apply(model, {"params": params}, changed)
  np.testing.assert_array_equal(np.asarray(a[:, :5]), np.asarray(b[:, :5]))
  assert np.abs(np.asarray(a[:, 5:] - b[:, 5:])).min(axis=-1).max() > 0


def test_left_padding_is_invisible():
  """A left-padded row (with key_mask) gives the same logits as the unpadded sequence."""
  cfg = _cfg(parallel_block=False, n_kv_heads=2)
  model, params, _ = _init(cfg)
  seq = np.array([3, 9, 4, 1], np.int32)
  padded = np.array([[0, 0, 3, 9, 4, 1]], np.int32)
  mask = np.array([[False, False, True, True, True, True]])
  alone, _ = _apply(model, {"params": params}, jnp.asarray(seq[None]))
  with_pad, _ = _apply(model, {"params": params}, jnp.asarray(padded), key_mask=jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(with_pad[0, 2:]), np.asarray(alone[0]), atol=1e-5)
  want = numpy_decoder(params, cfg, padded, mask, np.maximum(np.cumsum(mask, 1) - 1, 0))
  np.testing.assert_allclose(np.asarray(with_pad[0, 2:]), want[0, 2:], atol=2e-4, rtol=1e-4)


def test_scan_and_remat_match_plain_stack():
  cfg = _cfg(parallel_block=False)
  model, params, _ = _init(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 7)), jnp.int32)

  def loss_and_logits(m, p):
    logits, _ = m.apply({"params": p}, tokens)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  grad_fn = lambda m: jax.jit(jax.grad(lambda p: loss_and_logits(m, p), has_aux=True))
  g1, a = grad_fn(model)(params)
  # (scan without remat runs in the cache and partitioning tests; values cannot differ from
  # scan + remat, which is what this compares against the plain stack)
  for kw in (dict(remat=True), dict(scan_layers=True, remat=True, remat_policy="dots")):
    cfg2 = dataclasses.replace(cfg, **kw)
    model2 = dec.Decoder(cfg2)
    params2 = dec.stack_layers(params, cfg.n_layers) if cfg2.scan_layers else params
    # the restacked tree has exactly the structure (and shapes) the scanned model initialises
    init2 = nn.meta.unbox(jax.eval_shape(model2.init, jax.random.PRNGKey(0),
                                         jnp.zeros((1, 4), jnp.int32)))
    assert jax.tree.map(jnp.shape, init2["params"]) == jax.tree.map(jnp.shape, params2)
    g2, b = grad_fn(model2)(params2)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    if cfg2.scan_layers:
      g2 = dec.unstack_layers(g2, cfg.n_layers)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                         atol=1e-5, rtol=1e-4), g1, g2)


@pytest.mark.parametrize("kw", [dict(), dict(scan_layers=True, parallel_block=False, n_kv_heads=2)])
def test_kv_cache_matches_full_forward(kw):
  cfg = _cfg(**kw)
  model, params, _ = _init(cfg)
  if cfg.scan_layers:
    params = dec.stack_layers(dec.unstack_layers(params, cfg.n_layers), cfg.n_layers)
  rng = np.random.default_rng(3)
  lengths = [5, 2, 3]
  prompt_len, steps = 5, 4
  prompts = np.zeros((3, prompt_len), np.int32)
  prompt_mask = np.zeros((3, prompt_len), bool)
  for r, n in enumerate(lengths):  # left padding
    prompts[r, prompt_len - n:] = rng.integers(1, 40, n)
    prompt_mask[r, prompt_len - n:] = True
  cont = rng.integers(1, 40, (3, steps)).astype(np.int32)
  full_tokens = np.concatenate([prompts, cont], 1)
  full_mask = np.concatenate([prompt_mask, np.ones((3, steps), bool)], 1)
  full, _ = _apply(model, {"params": params}, jnp.asarray(full_tokens),
                   key_mask=jnp.asarray(full_mask))
  full = np.asarray(full)

  cache = dec.init_cache(model, 3, prompt_len + steps + 2)  # a little spare room
  prefill = jax.jit(lambda c, t, m: model.apply({"params": params, "cache": c}, t, key_mask=m,
                                                decode=True, mutable=["cache"]))
  (logits, _), mut = prefill(cache, jnp.asarray(prompts), jnp.asarray(prompt_mask))
  np.testing.assert_allclose(np.asarray(logits)[prompt_mask], full[:, :prompt_len][prompt_mask],
                             atol=1e-5)
  cache = mut["cache"]
  np.testing.assert_array_equal(np.asarray(cache["blocks"]["next_position"]), lengths)
  step = jax.jit(lambda c, t: model.apply({"params": params, "cache": c}, t, decode=True,
                                          mutable=["cache"]))
  for t in range(steps):
    (logits, _), mut = step(cache, jnp.asarray(cont[:, t:t + 1]))
    cache = mut["cache"]
    np.testing.assert_allclose(np.asarray(logits[:, 0]), full[:, prompt_len + t], atol=1e-5)
  assert int(cache["blocks"]["index"]) == prompt_len + steps

  # repeat_cache: each row's copies continue exactly like the row itself
  rep = dec.repeat_cache(mut["cache"], 2)
  (a, _), _ = step(cache, jnp.asarray(cont[:, :1]))
  (b, _), _ = step(rep, jnp.asarray(np.repeat(cont[:, :1], 2, 0)))
  np.testing.assert_allclose(np.asarray(b), np.repeat(np.asarray(a), 2, 0), atol=1e-6)


def test_dropout_only_in_training():
  cfg = _cfg(dropout=0.25)
  model, params, _ = _init(cfg)
  tokens = jnp.ones((2, 6), jnp.int32)
  a, _ = _apply(model, {"params": params}, tokens)
  b, _ = _apply(model, {"params": params}, tokens)
  c, _ = _apply(model, {"params": params}, tokens, train=True,
                     rngs={"dropout": jax.random.PRNGKey(1)})
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.abs(np.asarray(a - c)).max() > 1e-3


def test_hidden_and_logits_methods():
  cfg = _cfg(tie_embeddings=False)
  model, params, _ = _init(cfg)
  tokens = jnp.asarray([[1, 2, 3, 4]], jnp.int32)
  logits, hidden = _apply(model, {"params": params}, tokens)
  h = _apply(model, {"params": params}, tokens, method=dec.Decoder.hidden)
  np.testing.assert_array_equal(np.asarray(h), np.asarray(hidden))
  lo = _apply(model, {"params": params}, h[:, -1], method=dec.Decoder.logits_from_hidden)
  np.testing.assert_allclose(np.asarray(lo), np.asarray(logits[:, -1]), atol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_logical_partitioning(scan):
  cfg = _cfg(scan_layers=scan, tie_embeddings=False)
  model = dec.Decoder(cfg)
  tokens = jnp.zeros((8, 4), jnp.int32)
  init_fn = lambda rng: model.init(rng, tokens)
  abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  specs = nn.get_partition_spec(abstract)["params"]
  flat = jax.tree_util.tree_leaves_with_path(abstract["params"],
                                             is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for path, leaf in flat:
    assert isinstance(leaf, nn.LogicallyPartitioned), jax.tree_util.keystr(path)
    assert len(leaf.names) == leaf.value.ndim, jax.tree_util.keystr(path)
    known = {name for name, _ in sharding.DEFAULT_RULES}
    assert set(leaf.names) <= known, (jax.tree_util.keystr(path), leaf.names)
    if scan and "blocks" in jax.tree_util.keystr(path):
      assert leaf.names[0] == "layers"
  assert specs["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
  if not scan:
    return  # one sharded run (below) is enough; the plain stack shares every layer module

  # The spine's Partitioner shards it over a data x fsdp x tensor mesh and runs it.
  part = sharding.Partitioner(sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  params_sharded, shardings = part.partition_init(init_fn, jax.random.PRNGKey(0))
  q = params_sharded["params"]["blocks"]["layers"]["attention"]["query"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  with part.context():
    logits, _ = jax.jit(model.apply)(params_sharded, part.shard_inputs({"t": np.ones((8, 4),
                                                                                   np.int32)})["t"])
  ref, _ = _apply(model, jax.device_get(params_sharded), jnp.ones((8, 4), jnp.int32))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=1e-5)


def test_presets_and_validation():
  for name in dec.PRESETS:
    cfg = dec.preset(name, vocab_size=1000, max_len=64)
    assert cfg.vocab_size == 1000 and cfg.num_params() > 0
  with pytest.raises(ValueError, match="unknown decoder preset"):
    dec.preset("huge", 10, 10)
  with pytest.raises(ValueError, match="n_kv_heads"):
    _cfg(n_kv_heads=3)
  model, params, _ = _init(_cfg())
  with pytest.raises(ValueError, match="max_len"):
    _apply(model, {"params": params}, jnp.zeros((1, 17), jnp.int32))
