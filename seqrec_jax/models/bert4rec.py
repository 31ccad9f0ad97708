"""BERT4Rec (Sun et al., 2019): a bidirectional transformer trained by the cloze objective.

Same layout as SASRec (item + learned position embedding -> LayerNorm -> dropout -> post-LN
blocks, tied output layer), but attention is bidirectional: every position sees every non-padding
key.  The item table has one extra row, `mask_id = n_items + 1`, for the [MASK] token.

The next-item representation (what evaluation and SRA-CL's contrastive terms read through
`__call__`) follows BERT4Rec's inference: drop the oldest position, append [MASK] at the end, and
take the encoder output there.  Training is the cloze task in `seqrec_jax.cloze`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqrec_jax.models import layers
from seqrec_jax.models.sasrec import SASRec, SASRecConfig


@dataclasses.dataclass(frozen=True)
class BERT4RecConfig(SASRecConfig):
  """Hyper-parameters of BERT4Rec.

  Attributes:
    n_items: number of real items; ids are 1..n_items, 0 is padding, n_items + 1 is [MASK].
    max_len: input window length L.
    hidden: model width D.
    n_layers: transformer blocks.
    n_heads: attention heads (hidden % n_heads == 0).
    inner: FFN width.
    dropout: hidden dropout rate.
    attn_dropout: dropout on attention probabilities.
    act: FFN activation, "gelu" or "relu".
    ln_eps: LayerNorm epsilon.
    init_std: std of the normal initialiser of embeddings and dense kernels.
    vocab_pad_multiple: the table's n_items + 2 rows (padding, items, mask) are rounded up to this
      multiple; padding, mask and filler rows never score.
    dtype: compute dtype ("float32" or "bfloat16"); parameters stay float32.
    mask_prob: cloze masking probability per non-padding position (read by the cloze task).
  """
  dropout: float = 0.2
  attn_dropout: float = 0.2
  mask_prob: float = 0.2

  def __post_init__(self):
    super().__post_init__()  # SASRec's checks: heads divide hidden, activation, sizes
    if not 0.0 <= self.mask_prob <= 1.0:
      raise ValueError(f"model.mask_prob must be in [0, 1], got {self.mask_prob}")

  @property
  def mask_id(self) -> int:
    """The [MASK] token's id (the row right after the last item)."""
    return self.n_items + 1

  @property
  def table_rows(self) -> int:
    """Rows of the item table: n_items + 2 (padding and mask rows) rounded up."""
    return layers.padded_rows(self.n_items + 1, self.vocab_pad_multiple)

  def train_flops_per_sequence(self, loss_positions: str = "masked") -> float:
    """Model FLOPs of one cloze training sequence (forward + backward = 3 x forward).

    Every position runs every block (bidirectional: no last-only shortcut): per token and layer
    8 D^2 + 4 D I + 4 L D.  The output layer costs 2 D rows per scored position: the cloze task
    scores the masked ones ("masked": the last position and, on average, mask_prob of the other
    L - 1 of a full window), "all" every position, "last" one.
    """
    d, i, l = self.hidden, self.inner, self.max_len
    per_token = 8 * d * d + 4 * d * i + 4 * l * d
    encoder = l * self.n_layers * per_token
    scored = {"last": 1.0, "all": float(l)}.get(loss_positions, 1.0 + self.mask_prob * (l - 1))
    output = 2 * d * self.table_rows * scored
    return 3.0 * (encoder + output)


class BERT4Rec(SASRec):
  """Bidirectional transformer encoder with a tied item-embedding output layer.

  The same layers and parameter names as SASRec; only the attention mask (every non-padding key,
  no causal part), the [MASK] row of the item table and the next-item read-out differ.
  """
  config: BERT4RecConfig
  # `__call__` drops the oldest column to append [MASK]: a window cut to its items plus one
  # padding column gives the same output (`seqrec_jax.buckets`).
  truncation_slack = 1

  def _attention_mask(self, inputs: jax.Array) -> jax.Array:
    """[B, 1, L, L] bool: every query sees every non-padding key."""
    length = inputs.shape[1]
    return jnp.broadcast_to((inputs > 0)[:, None, None, :], (inputs.shape[0], 1, length, length))

  def next_item_inputs(self, inputs: jax.Array) -> jax.Array:
    """[B, L] window -> [B, L] window with the oldest position dropped and [MASK] appended."""
    mask = jnp.full((inputs.shape[0], 1), self.config.mask_id, inputs.dtype)
    return jnp.concatenate([inputs[:, 1:], mask], axis=1)

  def __call__(self, inputs: jax.Array, *, train: bool = False) -> jax.Array:
    """The next-item representation: [B, D] output at an appended [MASK] position."""
    return self.encode(self.next_item_inputs(inputs), train=train, last_only=True)[:, -1]
