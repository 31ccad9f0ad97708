"""CALRec's decoder-only language model: a PaLM-like transformer in Flax linen.

Architecture (PaLM, Chowdhery et al. 2022, with the knobs needed to load Llama and Gemma weights):
  token embedding (optionally x sqrt(D), Gemma) -> n_layers blocks -> final norm -> logits, where
  a block is either
    parallel (PaLM):   y = x + Attn(Norm(x)) + MLP(Norm(x))          (one pre-norm, one residual)
    sequential (Llama): h = x + Attn(Norm1(x));  y = h + MLP(Norm2(h))
  Attention is causal with rotary position embeddings (the Hugging Face "rotate_half" layout, so
  Llama checkpoints load without permuting q/k) and n_kv_heads key/value heads shared by groups of
  query heads (1 = multi-query attention as PaLM, n_heads = multi-head, between = grouped-query).
  The MLP is gated: down(act(gate(x)) * up(x)) with SiLU (SwiGLU) or tanh-GELU (GeGLU).  There are
  no biases.  The output layer is the embedding table itself unless `tie_embeddings=False`.

Parameters (under `variables["params"]`; every leaf is annotated with logical axes, so the spine's
`Partitioner` shards it by config rules alone):
  embedding            [V, D]          (vocab, embed)
  blocks/layer_{i}/    one per layer, or blocks/layers/ with every leaf stacked on a leading
                       `layers` axis when `scan_layers=True` (see `stack_layers`/`unstack_layers`):
    attn_norm/scale    [D]             (embed)
    mlp_norm/scale     [D]             (embed)          sequential blocks only
    attention/query    [D, H, K]       (embed, heads, kv)
    attention/key      [D, KVH, K]     (embed, kv_heads, kv)
    attention/value    [D, KVH, K]     (embed, kv_heads, kv)
    attention/out      [H, K, D]       (heads, kv, embed)
    mlp/gate, mlp/up   [D, F]          (embed, mlp)
    mlp/down           [F, D]          (mlp, embed)
  final_norm/scale     [D]             (embed)
  lm_head              [D, V]          (embed, vocab)   untied output layer only

KV cache (the flax "cache" collection, `decode=True`):
  `init_cache(model, batch_size, cache_len)` returns a zeroed cache with room for `cache_len`
  tokens per row.  Every `model.apply({"params": p, "cache": c}, tokens, key_mask=m, decode=True,
  mutable=["cache"])` appends `tokens` ([B, T]; T = prompt length for the prefill, then 1 per
  step) at the cache's write index and returns the updated cache.  The cache holds
    blocks/index          []        next write slot (shared by all rows),
    blocks/key_mask       [B, S]    which slots hold real tokens (False for left padding),
    blocks/next_position  [B]       the position the row's next real token gets (its real length),
    blocks/.../cached_key, cached_value  [B, S, KVH, K] per layer (keys after RoPE),
  so left-padded prompts of different lengths share slots but keep their own positions: a query
  at slot t attends to the slots <= t that hold real tokens.  `repeat_cache` repeats every row of a
  prefilled cache (for several samples per prompt).  The caller sizes the cache: writes past
  `cache_len` are not detected (the index is traced), so allocate prompt + new tokens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqrec_jax.models import layers as seq_layers

_NEG = -1e9  # additive mask value; finite so a fully masked (padding) query row stays finite


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Hyper-parameters of the decoder.

  Attributes:
    vocab_size: rows of the token embedding table V.
    d_model: model width D.
    n_layers: transformer blocks.
    n_heads: query heads H.
    n_kv_heads: key/value heads KVH (1 = multi-query attention, n_heads = multi-head); must
      divide n_heads.
    head_dim: per-head width K (need not equal d_model / n_heads; Gemma uses 256).
    mlp_dim: hidden width F of the gated MLP.
    max_len: the longest sequence a non-decoding forward pass accepts (RoPE itself has no table,
      so this only guards against silently running far outside the trained lengths).
    parallel_block: True = PaLM's parallel attention + MLP from one pre-norm; False = Llama's
      sequential block with two pre-norms.
    norm: "rms" (RMSNorm) or "layer" (LayerNorm without bias).
    norm_eps: epsilon of the norms.
    mlp_activation: "silu" (SwiGLU) or "gelu" (tanh-approximate GELU, Gemma's GeGLU).
    tie_embeddings: logits = hidden @ embedding^T; False adds a separate `lm_head` [D, V].
    rope_theta: RoPE base wavelength.
    embed_scale: multiply token embeddings by sqrt(d_model) (Gemma).
    norm_offset: norms scale by (1 + w) with w initialised at 0 (Gemma's RMSNorm).
    dropout: dropout rate on the attention and MLP outputs (training only).
    init_std: std of the normal initialiser; output projections (attention out, MLP down) use
      init_std / sqrt(2 n_layers) so the residual stream's variance does not grow with depth.
    dtype: compute dtype ("bfloat16" or "float32"); logits and returned hidden states are float32.
    param_dtype: parameter storage dtype.
    remat: rematerialise each block in the backward pass (activation memory ~ one block).
    remat_policy: "nothing" (save nothing) or "dots" (save matmul outputs without batch dims).
    scan_layers: run the blocks with `nn.scan` (one compiled block; parameters stacked on a
      leading `layers` axis).
  """
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  mlp_dim: int
  max_len: int
  parallel_block: bool = True
  norm: str = "rms"
  norm_eps: float = 1e-6
  mlp_activation: str = "silu"
  tie_embeddings: bool = True
  rope_theta: float = 10000.0
  embed_scale: bool = False
  norm_offset: bool = False
  dropout: float = 0.0
  init_std: float = 0.02
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  remat: bool = False
  remat_policy: str = "nothing"
  scan_layers: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                 "mlp_dim", "max_len"):
      if getattr(self, name) < 1:
        raise ValueError(f"DecoderConfig.{name}={getattr(self, name)} must be positive")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"DecoderConfig.n_heads={self.n_heads} is not divisible by "
                       f"n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"DecoderConfig.head_dim={self.head_dim} must be even for rotary embeddings")
    if self.norm not in ("rms", "layer"):
      raise ValueError(f"DecoderConfig.norm must be 'rms' or 'layer', got {self.norm!r}")
    if self.mlp_activation not in ("silu", "gelu"):
      raise ValueError(f"DecoderConfig.mlp_activation must be 'silu' or 'gelu', "
                       f"got {self.mlp_activation!r}")
    if self.remat_policy not in ("nothing", "dots"):
      raise ValueError(f"DecoderConfig.remat_policy must be 'nothing' or 'dots', "
                       f"got {self.remat_policy!r}")

  def matmul_params(self) -> int:
    """Parameters that take part in matmuls: every block's projections plus the output layer.

    The output layer (V x D) is counted whether or not it is tied, since the logits matmul runs
    either way; the embedding lookup and the norm scales are not matmuls.
    """
    d, k = self.d_model, self.head_dim
    attn = d * self.n_heads * k * 2 + d * self.n_kv_heads * k * 2  # q, out; k, v
    mlp = 3 * d * self.mlp_dim  # gate, up, down
    return self.n_layers * (attn + mlp) + self.vocab_size * d

  def num_params(self) -> int:
    """Exact number of parameters `Decoder(self).init` creates."""
    d = self.d_model
    norms_per_block = 1 if self.parallel_block else 2
    block_matmuls = self.matmul_params() - self.vocab_size * d
    embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return block_matmuls + self.n_layers * norms_per_block * d + d + embeddings

  def train_flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM's MFU accounting (Appendix B).

    6 N + 12 n_layers n_heads head_dim seq_len, where N = `matmul_params()`: 2 FLOPs per
    multiply-add in the forward pass and twice that in the backward pass give 6 per matmul
    parameter; attention scores (QK^T) and mixing (PV) cost 2 * 2 * H * K * seq_len per token and
    layer forward, times 3 with the backward pass.  As in PaLM the attention term is counted for
    the full (non-causal) square, so it is an upper bound of the work a causal kernel must do.

    Args:
      seq_len: training sequence length.

    Returns:
      FLOPs per trained token.
    """
    attention = 12.0 * self.n_layers * self.n_heads * self.head_dim * seq_len
    return 6.0 * self.matmul_params() + attention


# Named sizes.  Param counts are `DecoderConfig.num_params()` (tied embeddings; the tests check it
# against `init`), V = vocab_size:
#   tiny:  non-embedding 69,824; 76,288 at V = 101.
#   small: non-embedding 3,802,368; + 256 V.
#   base:  non-embedding 100,280,064 (12 x 8,355,840 block matmuls + norm scales); + 768 V,
#          124,856,064 at V = 32,000.
#   1b:    non-embedding 947,947,520 (16 x 59,244,544 block matmuls + 16 x 2,048 norm scales
#          + 2,048 final norm); + 2,048 V: 1,013,483,520 at V = 32,000, 1,472,235,520 at
#          V = 256,000.  PaLM-2-XXS-like: D 2048, 16 heads of 128, one shared kv head (MQA),
#          SwiGLU width 4 D, parallel blocks; remat + scanned layers for training.
PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=16, mlp_dim=128,
                 dtype="float32"),
    "small": dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=1, head_dim=64, mlp_dim=1024,
                  dtype="float32"),
    "base": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=1, head_dim=64, mlp_dim=3072),
    "1b": dict(d_model=2048, n_layers=16, n_heads=16, n_kv_heads=1, head_dim=128, mlp_dim=8192,
               remat=True, scan_layers=True),
}


def preset(name: str, vocab_size: int, max_len: int, **overrides) -> DecoderConfig:
  """A named configuration (see `PRESETS`) with the vocabulary, length and any field overridden.

  Args:
    name: one of `PRESETS`.
    vocab_size: embedding rows.
    max_len: longest training sequence.
    **overrides: any other `DecoderConfig` field.

  Returns:
    The DecoderConfig.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown decoder preset {name!r}; known: {sorted(PRESETS)}")
  fields = dict(PRESETS[name], vocab_size=vocab_size, max_len=max_len)
  unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(DecoderConfig)})
  if unknown:
    raise ValueError(f"preset overrides {unknown} are not DecoderConfig fields")
  fields.update(overrides)
  return DecoderConfig(**fields)


def _normal(std: float):
  return nn.initializers.normal(stddev=std)


def rope_sin_cos(positions: jax.Array, head_dim: int, theta: float) -> Tuple[jax.Array, jax.Array]:
  """Rotary tables in the "rotate_half" layout: frequency i drives dims i and i + K/2.

  Args:
    positions: [B, L] int positions.
    head_dim: K (even).
    theta: base wavelength.

  Returns:
    (sin, cos), each [B, L, K] float32.
  """
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))  # [K/2]
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  angles = jnp.concatenate([angles, angles], axis=-1)  # [B, L, K]
  return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """Rotates [B, L, N, K] heads by their positions' angles (computed in float32)."""
  half = x.shape[-1] // 2
  xf = x.astype(jnp.float32)
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)  # rotate_half(x)
  out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)


class Norm(nn.Module):
  """RMSNorm or bias-free LayerNorm, computed in float32, with a logically annotated scale."""
  config: DecoderConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    init = nn.initializers.zeros if cfg.norm_offset else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(init, ("embed",)), (x.shape[-1],),
                       jnp.dtype(cfg.param_dtype))
    xf = x.astype(jnp.float32)
    if cfg.norm == "layer":
      xf = xf - xf.mean(-1, keepdims=True)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.norm_eps)
    scale = scale.astype(jnp.float32)
    if cfg.norm_offset:
      scale = 1.0 + scale
    return (xf * scale).astype(x.dtype)


class Attention(nn.Module):
  """Causal grouped-query self-attention with RoPE and an optional KV cache."""
  config: DecoderConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array, mask: jax.Array,
               cache_index: jax.Array) -> jax.Array:
    """Self-attention of x over itself (or over the cache plus x when decoding).

    Args:
      x: [B, T, D] normalised inputs.
      sin, cos: [B, T, K] rotary tables of x's positions.
      mask: [B, T, S] bool, True where query t may attend to key s (S = T without a cache, the
        cache length when decoding).
      cache_index: [] int32 cache slot of x's first token (ignored unless decoding).

    Returns:
      [B, T, D].
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    pdtype = jnp.dtype(cfg.param_dtype)
    d, h, kvh, k = x.shape[-1], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    q_init = nn.with_logical_partitioning(_normal(cfg.init_std), ("embed", "heads", "kv"))
    kv_init = nn.with_logical_partitioning(_normal(cfg.init_std), ("embed", "kv_heads", "kv"))
    o_init = nn.with_logical_partitioning(_normal(out_std), ("heads", "kv", "embed"))
    w_q = self.param("query", q_init, (d, h, k), pdtype)
    w_k = self.param("key", kv_init, (d, kvh, k), pdtype)
    w_v = self.param("value", kv_init, (d, kvh, k), pdtype)
    w_o = self.param("out", o_init, (h, k, d), pdtype)

    q = jnp.einsum("btd,dhk->bthk", x, w_q.astype(dtype))  # [B, T, H, K]
    key = jnp.einsum("btd,dnk->btnk", x, w_k.astype(dtype))  # [B, T, KVH, K]
    value = jnp.einsum("btd,dnk->btnk", x, w_v.astype(dtype))  # [B, T, KVH, K]
    q = apply_rope(q, sin, cos) * jnp.asarray(1.0 / math.sqrt(k), dtype)
    key = apply_rope(key, sin, cos)

    if self.decode:
      b, t = x.shape[:2]
      # On the first (initialising) call the cache is created with the input's length, which is
      # how `init_cache` sizes it; afterwards it keeps its size and tokens are written at the
      # shared index.
      cached_key = self.variable("cache", "cached_key", jnp.zeros, (b, t, kvh, k), dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, (b, t, kvh, k), dtype)
      start = (0, cache_index, 0, 0)
      cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key.astype(dtype), start)
      cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value.astype(dtype),
                                                        start)
      key, value = cached_key.value, cached_value.value  # [B, S, KVH, K]

    b, t = q.shape[:2]
    q = q.reshape(b, t, kvh, h // kvh, k)  # query head n * G + g reads kv head n (HF repeat_kv)
    scores = jnp.einsum("btngk,bsnk->bngts", q, key, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores, _NEG)  # [B, KVH, G, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bngts,bsnk->btngk", probs, value).reshape(b, t, h, k)  # [B, T, H, K]
    return jnp.einsum("bthk,hkd->btd", out, w_o.astype(dtype))


class MLP(nn.Module):
  """Gated MLP: down(act(gate(x)) * up(x)), no biases."""
  config: DecoderConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    pdtype = jnp.dtype(cfg.param_dtype)
    d, f = x.shape[-1], cfg.mlp_dim
    in_init = nn.with_logical_partitioning(_normal(cfg.init_std), ("embed", "mlp"))
    w_gate = self.param("gate", in_init, (d, f), pdtype)
    w_up = self.param("up", in_init, (d, f), pdtype)
    w_down = self.param("down", nn.with_logical_partitioning(
        _normal(cfg.init_std / math.sqrt(2 * cfg.n_layers)), ("mlp", "embed")), (f, d), pdtype)
    gate = jnp.einsum("btd,df->btf", x, w_gate.astype(dtype))
    up = jnp.einsum("btd,df->btf", x, w_up.astype(dtype))
    if cfg.mlp_activation == "silu":
      gate = jax.nn.silu(gate)
    else:
      gate = jax.nn.gelu(gate, approximate=True)
    hidden = nn.with_logical_constraint(gate * up, ("batch", "length", "mlp"))  # [B, T, F]
    return jnp.einsum("btf,fd->btd", hidden, w_down.astype(dtype))


class Block(nn.Module):
  """One transformer block, parallel (PaLM) or sequential (Llama).

  `train` and `decode` are attributes rather than call arguments so that `nn.remat` and `nn.scan`
  see only array arguments.  With `scanned=True` the block returns (x, None), the carry/output
  pair `nn.scan` expects.
  """
  config: DecoderConfig
  train: bool = False
  decode: bool = False
  scanned: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array, mask: jax.Array,
               cache_index: jax.Array):
    """x: [B, T, D] residual stream; see `Attention` for the other arguments."""
    cfg = self.config
    drop = seq_layers.Dropout(cfg.dropout)
    attention = Attention(cfg, decode=self.decode, name="attention")
    mlp = MLP(cfg, name="mlp")
    h = Norm(cfg, name="attn_norm")(x)
    attn = drop(attention(h, sin, cos, mask, cache_index), deterministic=not self.train)
    if cfg.parallel_block:
      x = x + attn + drop(mlp(h), deterministic=not self.train)
    else:
      x = x + attn
      x = x + drop(mlp(Norm(cfg, name="mlp_norm")(x)), deterministic=not self.train)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return (x, None) if self.scanned else x


class BlockStack(nn.Module):
  """The n_layers blocks plus the position/mask bookkeeping (and the cache's shared state)."""
  config: DecoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: Optional[jax.Array], positions: Optional[jax.Array],
               *, train: bool, decode: bool) -> jax.Array:
    """Runs the blocks.

    Args:
      x: [B, T, D] embedded tokens in the compute dtype.
      key_mask: [B, T] bool real tokens, or None (all real).
      positions: [B, T] int positions, or None: cumsum(key_mask) - 1 (= arange for right-padded
        or unpadded rows, and the real-token index for left-padded rows), continuing from the
        cache's per-row position when decoding.
      train: dropout on.
      decode: read and extend the KV cache.

    Returns:
      [B, T, D] residual stream after the last block (before the final norm).
    """
    cfg = self.config
    b, t = x.shape[:2]
    if key_mask is None:
      key_mask = jnp.ones((b, t), bool)
    key_mask = key_mask.astype(bool)
    offsets = jnp.cumsum(key_mask.astype(jnp.int32), axis=1) - 1  # [B, T]

    if decode:
      index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      slot_mask = self.variable("cache", "key_mask", jnp.zeros, (b, t), bool)
      next_pos = self.variable("cache", "next_position", jnp.zeros, (b,), jnp.int32)
      cache_index = index.value
      if positions is None:
        positions = jnp.maximum(next_pos.value[:, None] + offsets, 0)
      slots = jax.lax.dynamic_update_slice(slot_mask.value, key_mask, (0, cache_index))  # [B, S]
      query_slot = cache_index + jnp.arange(t)  # [T]
      causal = jnp.arange(slots.shape[1])[None, :] <= query_slot[:, None]  # [T, S]
      mask = causal[None] & slots[:, None, :]  # [B, T, S]
      if not self.is_initializing():
        # init only sizes the cache; it must come out empty.
        slot_mask.value = slots
        next_pos.value = next_pos.value + key_mask.sum(axis=1, dtype=jnp.int32)
        index.value = cache_index + t
    else:
      if t > cfg.max_len:
        raise ValueError(f"input length {t} exceeds the decoder's max_len {cfg.max_len}")
      cache_index = jnp.zeros((), jnp.int32)
      if positions is None:
        positions = jnp.maximum(offsets, 0)
      causal = jnp.tril(jnp.ones((t, t), bool))  # [T, T]
      mask = causal[None] & key_mask[:, None, :]  # [B, T, T]

    sin, cos = rope_sin_cos(positions, cfg.head_dim, cfg.rope_theta)  # [B, T, K] each
    block_cls = Block
    if cfg.remat:
      policy = (jax.checkpoint_policies.nothing_saveable if cfg.remat_policy == "nothing"
                else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
      # Inside scan, CSE across iterations cannot undo the remat, so prevent_cse is not needed.
      block_cls = nn.remat(Block, prevent_cse=not cfg.scan_layers, policy=policy)
    if cfg.scan_layers:
      stack = nn.scan(block_cls, variable_axes={"params": 0, "cache": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * 4, length=cfg.n_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(cfg, train=train, decode=decode, scanned=True, name="layers")(
          x, sin, cos, mask, cache_index)
    else:
      for i in range(cfg.n_layers):
        x = block_cls(cfg, train=train, decode=decode, name=f"layer_{i}")(
            x, sin, cos, mask, cache_index)
    return x


class Decoder(nn.Module):
  """The decoder LM.  See the module docstring for the parameter tree and the KV cache."""
  config: DecoderConfig

  def setup(self):
    cfg = self.config
    pdtype = jnp.dtype(cfg.param_dtype)
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(_normal(cfg.init_std), ("vocab", "embed")),
        (cfg.vocab_size, cfg.d_model), pdtype)
    self.blocks = BlockStack(cfg)
    self.final_norm = Norm(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = self.param(
          "lm_head", nn.with_logical_partitioning(_normal(cfg.init_std), ("embed", "vocab")),
          (cfg.d_model, cfg.vocab_size), pdtype)

  def hidden(self, tokens: jax.Array, *, positions: Optional[jax.Array] = None,
             key_mask: Optional[jax.Array] = None, train: bool = False,
             decode: bool = False) -> jax.Array:
    """Last-layer states after the final norm, without the logits.

    Args:
      tokens: [B, L] int32 token ids.
      positions: [B, L] int positions; default cumsum(key_mask) - 1 (arange without padding).
      key_mask: [B, L] bool, True for real tokens; None = all real.
      train: dropout on (needs a "dropout" rng).
      decode: use and extend the "cache" collection (apply with mutable=["cache"]).

    Returns:
      [B, L, D] float32.
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    x = jnp.take(self.embedding, tokens, axis=0).astype(dtype)  # [B, L, D]
    if cfg.embed_scale:
      # Gemma rounds the normaliser to the compute dtype before multiplying.
      x = x * jnp.asarray(math.sqrt(cfg.d_model), dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = self.blocks(x, key_mask, positions, train=train, decode=decode)
    x = self.final_norm(x).astype(jnp.float32)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

  def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
    """[..., D] final-norm states -> [..., V] float32 logits (matmul in the compute dtype)."""
    dtype = jnp.dtype(self.config.dtype)
    h = hidden.astype(dtype)
    if self.config.tie_embeddings:
      logits = jnp.einsum("...d,vd->...v", h, self.embedding.astype(dtype),
                          preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum("...d,dv->...v", h, self.lm_head.astype(dtype),
                          preferred_element_type=jnp.float32)
    if logits.ndim == 3:
      logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    return logits

  def __call__(self, tokens: jax.Array, *, positions: Optional[jax.Array] = None,
               key_mask: Optional[jax.Array] = None, train: bool = False,
               decode: bool = False) -> Tuple[jax.Array, jax.Array]:
    """Logits and hidden states; arguments as `hidden`.

    Returns:
      (logits [B, L, V] float32, hidden [B, L, D] float32).
    """
    h = self.hidden(tokens, positions=positions, key_mask=key_mask, train=train, decode=decode)
    return self.logits_from_hidden(h), h


def init_cache(model: Decoder, batch_size: int, cache_len: int) -> Any:
  """A zeroed "cache" collection with room for `cache_len` tokens in each of `batch_size` rows.

  Built from the shapes of a decoding `init` (abstractly evaluated, so no parameters are
  materialised).
  """
  tokens = jnp.zeros((batch_size, cache_len), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, decode=True)["cache"])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def repeat_cache(cache: Any, repeats: int) -> Any:
  """Repeats every row of a cache `repeats` times (row b -> rows b*repeats .. b*repeats+r-1).

  Leaves are identified by name: `cached_key`/`cached_value` have the batch axis 4 axes from the
  end (after the stacked `layers` axis when scanned), `key_mask`/`next_position` lead with it and
  the shared `index` has none.
  """
  def rep(path, leaf):
    name = getattr(path[-1], "key", str(path[-1]))
    if name in ("cached_key", "cached_value"):
      return jnp.repeat(leaf, repeats, axis=leaf.ndim - 4)
    if name in ("key_mask", "next_position"):
      return jnp.repeat(leaf, repeats, axis=0)
    if name == "index":
      return leaf
    raise ValueError(f"repeat_cache: unexpected cache entry {jax.tree_util.keystr(path)}")

  return jax.tree_util.tree_map_with_path(rep, cache)


def stack_layers(params: Dict[str, Any], n_layers: int) -> Dict[str, Any]:
  """Per-layer params (blocks/layer_{i}) -> scanned params (blocks/layers, leading axis n_layers).

  numpy leaves stay numpy (host-side conversion of large checkpoints), others become jax arrays.
  """
  params = dict(params)
  blocks = params["blocks"]
  per_layer = [blocks[f"layer_{i}"] for i in range(n_layers)]

  def stack(*xs):
    return np.stack(xs) if isinstance(xs[0], np.ndarray) else jnp.stack(xs)

  params["blocks"] = {"layers": jax.tree.map(stack, *per_layer)}
  return params


def unstack_layers(params: Dict[str, Any], n_layers: int) -> Dict[str, Any]:
  """Scanned params (blocks/layers) -> per-layer params (blocks/layer_{i})."""
  params = dict(params)
  stacked = params["blocks"]["layers"]
  params["blocks"] = {f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], stacked)
                      for i in range(n_layers)}
  return params
