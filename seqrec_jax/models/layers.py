"""Transformer building blocks with logical axis names on every parameter.

Logical axes (the one vocabulary, see `seqrec_jax.sharding.DEFAULT_RULES`):
  batch, length, embed, mlp, heads, kv, vocab.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

_NEG = -1e9  # additive mask value; finite so an all-masked (padding) query row stays finite


def _normal(std):
  return nn.initializers.normal(stddev=std)


def padded_rows(n_items: int, multiple: int) -> int:
  """Rows of an item table: n_items + 1 (row 0 = padding) rounded up to `multiple`."""
  m = max(1, multiple)
  return -(-(n_items + 1) // m) * m


def mask_non_items(logits: jax.Array, n_items: int) -> jax.Array:
  """float32 scores with the padding row 0 and the filler rows past n_items set to -inf."""
  ids = jnp.arange(logits.shape[-1])
  real = (ids >= 1) & (ids <= n_items)
  return jnp.where(real, logits.astype(jnp.float32), -jnp.inf)


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, x * Phi(x), as RecBole's SASRec uses.

  Written with `erf` rather than flax's `erfc` form: the same function (to float rounding) but
  XLA:CPU lowers erf to a cheaper polynomial, which matters inside the training step.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))


class Dropout(nn.Module):
  """Inverted dropout drawing 8 random bits per element, four elements per uint32 draw.

  Threefry bit generation dominates dropout's cost on CPU; taking four independent bytes from
  every 32-bit draw makes it ~6x cheaper.  The drop probability is therefore quantised to 1/256
  (exact for 0, 0.25, 0.5, 0.75; 0.2 becomes 51/256 = 0.1992) and surviving values are scaled by
  the exact inverse keep probability.
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    if deterministic or self.rate <= 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    threshold = int(round(self.rate * 256))
    keep_prob = (256 - threshold) / 256.0
    rng = self.make_rng("dropout")
    if x.shape and x.shape[-1] % 4 == 0:
      # Draw in x's own layout ([..., last / 4] words -> [..., last / 4, 4] bytes): no slicing,
      # so XLA fuses the unpacking into the select.
      words = jax.random.bits(rng, x.shape[:-1] + (x.shape[-1] // 4,), jnp.uint32)
      byte = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(x.shape)
    else:
      n = x.size
      words = jax.random.bits(rng, (-(-n // 4),), jnp.uint32)
      byte = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(-1)[:n].reshape(x.shape)
    scale = jnp.asarray(1.0 / keep_prob, x.dtype)  # a multiply, not a divide, per element
    return jnp.where(byte >= threshold, x * scale, jnp.zeros_like(x))


class Embed(nn.Module):
  """An embedding table [vocab, embed] that can also score vectors against itself."""
  num_embeddings: int
  features: int
  init_std: float = 0.02

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(_normal(self.init_std), ("vocab", "embed")),
        (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """[...] int ids -> [..., features]."""
    return jnp.take(self.embedding, ids, axis=0)

  def attend(self, x: jax.Array) -> jax.Array:
    """[..., features] -> [..., vocab] dot products with every row (the tied output layer)."""
    return jnp.einsum("...d,vd->...v", x, self.embedding.astype(x.dtype))


class LayerNorm(nn.Module):
  """LayerNorm with logically-annotated scale and bias."""
  eps: float = 1e-12

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.LayerNorm(
        epsilon=self.eps, dtype=x.dtype, param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(x)


def dense(features, axes, init_std, dtype, name):
  """A biased Dense layer whose kernel and bias carry logical axes."""
  return nn.Dense(
      features, dtype=dtype, param_dtype=jnp.float32, name=name,
      kernel_init=nn.with_logical_partitioning(_normal(init_std), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[-1],)))


class MultiHeadAttention(nn.Module):
  """Multi-head self-attention with biased q/k/v/out projections (RecBole's layout)."""
  n_heads: int
  attn_dropout: float
  init_std: float = 0.02
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool,
               last_only: bool = False) -> jax.Array:
    """Self-attention.

    Args:
      x: [B, L, D] inputs (keys and values always come from every position).
      mask: [B, 1, L, L] bool, True where query i may attend to key j.
      train: dropout on/off.
      last_only: compute queries (and so outputs) for the last position only.

    Returns:
      [B, L, D], or [B, 1, D] with last_only.
    """
    d = x.shape[-1]
    head_dim = d // self.n_heads
    dtype = jnp.dtype(self.dtype)
    kernel_init = nn.with_logical_partitioning(_normal(self.init_std), ("embed", "heads", "kv"))
    bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv"))

    def proj(name, inputs):
      w = self.param(f"{name}_kernel", kernel_init, (d, self.n_heads, head_dim), jnp.float32)
      b = self.param(f"{name}_bias", bias_init, (self.n_heads, head_dim), jnp.float32)
      return jnp.einsum("bld,dhk->blhk", inputs, w.astype(dtype)) + b.astype(dtype)  # [B, L, H, K]

    if last_only:
      x_q, mask = x[:, -1:], mask[:, :, -1:]  # [B, 1, D], [B, 1, 1, L]
    else:
      x_q = x
    q, k, v = proj("query", x_q), proj("key", x), proj("value", x)
    logits = jnp.einsum("blhk,bmhk->bhlm", q, k) / jnp.sqrt(jnp.asarray(head_dim, dtype))
    logits = jnp.where(mask, logits, _NEG)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)  # [B, H, L, L]
    probs = Dropout(self.attn_dropout)(probs, deterministic=not train)
    out = jnp.einsum("bhlm,bmhk->blhk", probs, v)  # [B, L, H, K]
    w_out = self.param(
        "out_kernel",
        nn.with_logical_partitioning(_normal(self.init_std), ("heads", "kv", "embed")),
        (self.n_heads, head_dim, d), jnp.float32)
    b_out = self.param("out_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                       (d,), jnp.float32)
    return jnp.einsum("blhk,hkd->bld", out, w_out.astype(dtype)) + b_out.astype(dtype)


class PostLNBlock(nn.Module):
  """A post-LN transformer block: LN(x + Drop(Attn(x))), then LN(h + Drop(FFN(h)))."""
  n_heads: int
  inner: int
  dropout: float
  attn_dropout: float
  act: str = "gelu"
  ln_eps: float = 1e-12
  init_std: float = 0.02
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool,
               last_only: bool = False) -> jax.Array:
    """x: [B, L, D]; mask: [B, 1, L, L].

    Returns [B, L, D]; with last_only, [B, 1, D] for the last position alone (everything after
    attention is position-wise, so the other positions' outputs need not be computed when only
    the last one is used, as in SASRec's last-position loss and ranking).
    """
    d = x.shape[-1]
    attn = MultiHeadAttention(self.n_heads, self.attn_dropout, self.init_std, self.dtype,
                              name="attention")(x, mask, train=train, last_only=last_only)
    attn = Dropout(self.dropout)(attn, deterministic=not train)
    residual = x[:, -1:] if last_only else x
    h = LayerNorm(self.ln_eps, name="attention_norm")(residual + attn)
    h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
    f = dense(self.inner, ("embed", "mlp"), self.init_std, self.dtype, "ffn_in")(h)
    f = gelu(f) if self.act == "gelu" else nn.relu(f)
    f = nn.with_logical_constraint(f, ("batch", "length", "mlp"))
    f = dense(d, ("mlp", "embed"), self.init_std, self.dtype, "ffn_out")(f)
    f = Dropout(self.dropout)(f, deterministic=not train)
    out = LayerNorm(self.ln_eps, name="ffn_norm")(h + f)
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))
