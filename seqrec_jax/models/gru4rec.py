"""GRU4Rec (Hidasi et al., 2016) in RecBole's sequential form, with the shared encoder interface.

Item embedding -> dropout -> a stack of GRU layers -> dense back to the embedding width; the
sequence representation is the state after the last item, and scores are its dot products with the
item table (tied, as RecBole's CE setting).  Inputs are left-padded: the recurrence holds its state
through padding positions, so padding never changes the representation.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqrec_jax.models import layers


@dataclasses.dataclass(frozen=True)
class GRU4RecConfig:
  """Hyper-parameters of GRU4Rec.

  Attributes:
    n_items: number of real items (ids 1..n_items, 0 = padding).
    max_len: input window length L.
    hidden: item embedding width (the representation width, for tied scoring).
    gru_hidden: GRU state width.
    n_layers: stacked GRU layers.
    dropout: dropout on the item embeddings.
    init_std: std of the embedding initialiser.
    vocab_pad_multiple: item-table rows rounded up to this multiple.
    dtype: compute dtype.
  """
  n_items: int
  max_len: int
  hidden: int = 64
  gru_hidden: int = 128
  n_layers: int = 1
  dropout: float = 0.3
  init_std: float = 0.02
  vocab_pad_multiple: int = 64
  dtype: str = "float32"

  @property
  def table_rows(self) -> int:
    return layers.padded_rows(self.n_items, self.vocab_pad_multiple)

  def train_flops_per_sequence(self, loss_positions: str = "last") -> float:
    """Matmul FLOPs of one training sequence (3 x forward): 3 gates x (input + state) per step."""
    d, g, l = self.hidden, self.gru_hidden, self.max_len
    gru = l * (2 * 3 * g * (d + g) + 2 * 3 * g * (self.n_layers - 1) * 2 * g)
    out = 2 * g * d * (l if loss_positions == "all" else 1)
    scores = 2 * d * self.n_items * (l if loss_positions == "all" else 1)
    return 3.0 * (gru + out + scores)


class _MaskedGRU(nn.Module):
  """One GRU layer over time that keeps its state where the step is padding."""
  features: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
    """x: [B, L, D_in]; valid: [B, L] bool. Returns [B, L, features] states."""
    cell = nn.GRUCell(
        self.features, dtype=jnp.dtype(self.dtype), param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                 ("embed", "mlp")),
        recurrent_kernel_init=nn.with_logical_partitioning(nn.initializers.orthogonal(),
                                                           ("mlp", "mlp_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))

    def step(cell, carry, inputs):
      x_t, valid_t = inputs
      new, _ = cell(carry, x_t)
      carry = jnp.where(valid_t[:, None], new, carry)
      return carry, carry

    scan = nn.scan(step, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=1, out_axes=1)
    carry = jnp.zeros((x.shape[0], self.features), jnp.dtype(self.dtype))
    _, states = scan(cell, carry, (x, valid))
    return states


class GRU4Rec(nn.Module):
  """GRU4Rec encoder with a tied item-embedding output layer."""
  config: GRU4RecConfig

  def setup(self):
    cfg = self.config
    self.item_embedding = layers.Embed(cfg.table_rows, cfg.hidden, cfg.init_std,
                                       name="item_embedding")
    self.dropout = layers.Dropout(cfg.dropout)
    self.grus = [_MaskedGRU(cfg.gru_hidden, cfg.dtype, name=f"gru_{i}")
                 for i in range(cfg.n_layers)]
    self.out = layers.dense(cfg.hidden, ("mlp", "embed"), cfg.init_std, cfg.dtype, "out")

  def encode(self, inputs: jax.Array, *, train: bool, last_only: bool = False) -> jax.Array:
    """[B, L] ids -> [B, L, D] (or [B, 1, D] with last_only) representations."""
    valid = inputs > 0
    x = self.dropout(self.item_embedding(inputs), deterministic=not train)
    x = x.astype(jnp.dtype(self.config.dtype))
    for gru in self.grus:
      x = gru(x, valid)
    if last_only:
      x = x[:, -1:]
    return self.out(x)

  def __call__(self, inputs: jax.Array, *, train: bool = False) -> jax.Array:
    """The sequence representation: [B, D], the state after the last item."""
    return self.encode(inputs, train=train, last_only=True)[:, -1]

  def logits(self, user_vectors: jax.Array) -> jax.Array:
    """[..., D] -> [..., table_rows] unmasked dot products (see `SASRec.logits`)."""
    return self.item_embedding.attend(user_vectors)

  def score(self, user_vectors: jax.Array) -> jax.Array:
    """[..., D] -> [..., table_rows] scores; non-item rows are -inf."""
    return layers.mask_non_items(self.logits(user_vectors), self.config.n_items)
