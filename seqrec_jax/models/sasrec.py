"""SASRec (Kang & McAuley, 2018) as the SRA-CL reference code and RecBole build it.

Item embedding (row 0 = padding) + learned absolute position embedding -> LayerNorm -> dropout ->
post-LN transformer blocks (attention + residual + LayerNorm, GELU FFN + residual + LayerNorm).
The sequence representation is the output at the last position; scores are its dot products with
the item embedding table itself (tied output layer).

Every parameter carries logical axis names (see `seqrec_jax.sharding`), so the same module is
data-, fsdp- or tensor-parallel by the config's rules alone.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqrec_jax.models import layers


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
  """Hyper-parameters of SASRec (the model never sees the global ConfigDict).

  Attributes:
    n_items: number of real items; ids are 1..n_items and 0 is padding.
    max_len: input window length L.
    hidden: model width D.
    n_layers: transformer blocks.
    n_heads: attention heads (hidden % n_heads == 0).
    inner: FFN width.
    dropout: hidden dropout rate (embeddings, attention output, FFN output).
    attn_dropout: dropout on attention probabilities.
    act: FFN activation, "gelu" (exact erf form, as RecBole) or "relu".
    ln_eps: LayerNorm epsilon (RecBole: 1e-12).
    init_std: std of the normal initialiser of embeddings and dense kernels.
    vocab_pad_multiple: the item table has n_items + 1 rows rounded up to this multiple, so that it
      divides evenly over an item-sharded mesh axis; the extra rows never score.
    dtype: compute dtype ("float32" or "bfloat16"); parameters stay float32.
  """
  n_items: int
  max_len: int
  hidden: int = 64
  n_layers: int = 2
  n_heads: int = 2
  inner: int = 256
  dropout: float = 0.5
  attn_dropout: float = 0.5
  act: str = "gelu"
  ln_eps: float = 1e-12
  init_std: float = 0.02
  vocab_pad_multiple: int = 64
  dtype: str = "float32"

  def __post_init__(self):
    if self.hidden % self.n_heads:
      raise ValueError(f"model.hidden={self.hidden} is not divisible by model.n_heads={self.n_heads}")
    if self.act not in ("gelu", "relu"):
      raise ValueError(f"model.act must be 'gelu' or 'relu', got {self.act!r}")
    if self.n_items < 1 or self.max_len < 1:
      raise ValueError(f"n_items={self.n_items} and max_len={self.max_len} must be positive")

  def train_flops_per_sequence(self, loss_positions: str = "last") -> float:
    """Model FLOPs of one training sequence (forward + backward = 3 x forward).

    Counts the matmul FLOPs the loss needs (2 per multiply-add): per token and layer, q/k/v/out
    projections 8 D^2, the FFN 4 D I, attention scores and mixing 4 L D; plus the output layer
    2 D n_items at the last position (or at all L positions with loss_positions="all").
    """
    d, i, l = self.hidden, self.inner, self.max_len
    per_token = 8 * d * d + 4 * d * i + 4 * l * d
    if loss_positions == "all":
      encoder = l * self.n_layers * per_token
      output = 2 * d * self.n_items * l
    else:
      # Only the last position of the final block is needed: its k/v projections run at every
      # position (4 D^2 per token), everything else at the last position alone.
      encoder = l * (self.n_layers - 1) * per_token + l * 4 * d * d + per_token - 4 * d * d
      output = 2 * d * self.n_items
    return 3.0 * (encoder + output)

  @property
  def table_rows(self) -> int:
    """Rows of the item table: n_items + 1 (padding row) rounded up to vocab_pad_multiple."""
    return layers.padded_rows(self.n_items, self.vocab_pad_multiple)


class SASRec(nn.Module):
  """SASRec encoder with a tied item-embedding output layer."""
  config: SASRecConfig

  def setup(self):
    cfg = self.config
    self.item_embedding = layers.Embed(cfg.table_rows, cfg.hidden, cfg.init_std, name="item_embedding")
    self.position_embedding = self.param(
        "position_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("length", "embed")),
        (cfg.max_len, cfg.hidden), jnp.float32)
    self.input_norm = layers.LayerNorm(cfg.ln_eps, name="input_norm")
    self.blocks = [layers.PostLNBlock(
        n_heads=cfg.n_heads, inner=cfg.inner, dropout=cfg.dropout, attn_dropout=cfg.attn_dropout,
        act=cfg.act, ln_eps=cfg.ln_eps, init_std=cfg.init_std, dtype=cfg.dtype, name=f"block_{i}")
                   for i in range(cfg.n_layers)]
    self.dropout = layers.Dropout(cfg.dropout)

  def encode(self, inputs: jax.Array, *, train: bool, last_only: bool = False) -> jax.Array:
    """Encodes left-padded item sequences.

    Args:
      inputs: [B, L] int32 item ids, 0 = padding.
      train: enables dropout (needs a "dropout" rng).
      last_only: the final block computes the last position only (same values there).

    Returns:
      [B, L, D] hidden states at every position, or [B, 1, D] with last_only.
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    length = inputs.shape[1]
    if length > cfg.max_len:
      raise ValueError(f"input length {length} exceeds model max_len {cfg.max_len}")
    x = self.item_embedding(inputs)  # [B, L, D]
    x = x + self.position_embedding[None, cfg.max_len - length:]  # right-aligned positions
    x = self.dropout(self.input_norm(x), deterministic=not train).astype(dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    mask = self._attention_mask(inputs)  # [B, 1, L, L]
    for i, block in enumerate(self.blocks):
      x = block(x, mask, train=train, last_only=last_only and i == len(self.blocks) - 1)
    return x

  def _attention_mask(self, inputs: jax.Array) -> jax.Array:
    """[B, 1, L, L] bool: query i sees non-padding keys j <= i (causal)."""
    length = inputs.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))  # [L, L]
    return causal[None, None] & (inputs > 0)[:, None, None, :]

  def __call__(self, inputs: jax.Array, *, train: bool = False) -> jax.Array:
    """The sequence representation: [B, D] hidden state at the last position."""
    return self.encode(inputs, train=train, last_only=True)[:, -1]

  def logits(self, user_vectors: jax.Array) -> jax.Array:
    """[..., D] -> [..., table_rows] dot products with every table row, unmasked (compute dtype).

    Only for callers that mask rows 0 and > n_items themselves (`recommend.topk_step` through
    `grouped_top_k(valid=...)`); everything else uses `score`.
    """
    logits = self.item_embedding.attend(user_vectors)  # [..., V]
    return nn.with_logical_constraint(logits, ("batch", "vocab") if logits.ndim == 2
                                      else ("batch", "length", "vocab"))

  def score(self, user_vectors: jax.Array) -> jax.Array:
    """Scores every row of the item table.

    Args:
      user_vectors: [..., D].

    Returns:
      [..., table_rows] float32 scores; the padding row 0 and the rows past n_items are -inf so
      they can never be predicted or ranked.
    """
    return layers.mask_non_items(self.logits(user_vectors), self.config.n_items)
