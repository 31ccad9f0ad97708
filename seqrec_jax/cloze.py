"""The cloze (masked-item) task that trains BERT4Rec.

Each train example's `target_seq` (the window ending with the target item) is masked on device:
every non-padding position is replaced by [MASK] with probability `mask_prob`, and the last
position (the target) always is, so the next-item case that evaluation asks for is trained in
every example (as BERT4Rec's fine-tuning on the appended [MASK]).  The bidirectional encoder
runs over every position; cross-entropy counts at the masked positions only.

Only the masked positions are scored against the item table (the [N, V] output layer dominates
the step): their hidden states are gathered into a static budget of `scoring_budget(B, L, p)`
rows, which a batch exceeds with probability < 1e-4 even when every sequence is full; a batch
that does is scored densely instead (`lax.cond`), so the loss is exact either way.

Registered as task "cloze" on import (`seqrec_jax.tasks` imports this module on demand).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from seqrec_jax import tasks


def _encode(module, inputs, train):
  return module.encode(inputs, train=train)


def _score(module, hidden):
  return module.score(hidden)


def scoring_budget(batch: int, length: int, mask_prob: float) -> int:
  """Rows scored per batch: the masked count of `batch` full-length sequences (the last position
  always, each other one with probability `mask_prob`) at its mean + 4 standard deviations,
  rounded up to a multiple of 8 and capped at batch * length."""
  n = batch * (length - 1)
  mean = batch + n * mask_prob
  std = math.sqrt(n * mask_prob * (1.0 - mask_prob))
  return min(batch * length, int(math.ceil((mean + 4.0 * std + 1.0) / 8.0)) * 8)


def cloze_mask(target_seq: jax.Array, rng: jax.Array, mask_prob: float) -> jax.Array:
  """Which positions to mask.

  Args:
    target_seq: [B, L] int ids, 0 = padding (left-padded; the last position is the target).
    rng: key for the Bernoulli draws.
    mask_prob: masking probability per non-padding position.

  Returns:
    [B, L] bool: Bernoulli(mask_prob) over non-padding positions, the last position always True
    where it is not padding.
  """
  valid = target_seq > 0  # [B, L]
  drawn = jax.random.bernoulli(rng, mask_prob, target_seq.shape)  # [B, L]
  last = jnp.arange(target_seq.shape[1]) == target_seq.shape[1] - 1  # [L]
  return valid & (drawn | last[None])


def cloze_loss(backbone_params: Any, batch: Dict[str, jax.Array], rng: jax.Array, *,
               model: nn.Module, mask_id: int, mask_prob: float, train: bool = True,
               budget: Optional[int] = None):
  """Masked-item cross-entropy over all items.

  Args:
    backbone_params: encoder parameters.
    batch: target_seq [B, L], weights [B].
    rng: key; split into the masking draw and dropout.
    model: a bidirectional encoder whose table has a [MASK] row `mask_id`.
    mask_id: the [MASK] token id.
    mask_prob: masking probability per non-padding position.
    train: dropout on/off.
    budget: rows scored when the batch's masked positions fit (default `scoring_budget`); the
      result does not depend on it.

  Returns:
    (sum of weighted CE over masked positions, sum of their weights, masked [B, L] bool).
  """
  mask_rng, dropout_rng = jax.random.split(rng)
  targets = batch["target_seq"]  # [B, L]
  b, l = targets.shape
  masked = cloze_mask(targets, mask_rng, mask_prob)  # [B, L]
  inputs = jnp.where(masked, jnp.asarray(mask_id, targets.dtype), targets)  # [B, L]
  hidden = model.apply({"params": backbone_params}, inputs, train, rngs={"dropout": dropout_rng},
                       method=_encode)  # [B, L, D]
  w = (batch["weights"][:, None] * masked).reshape(-1)  # [B L]
  flat_hidden = hidden.reshape(b * l, -1)  # [B L, D]
  flat_targets = targets.reshape(-1)  # [B L]

  def weighted_ce(h, t, wt):
    logits = model.apply({"params": backbone_params}, h, method=_score)  # [N, V]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, t)  # [N]
    return jnp.sum(jnp.where(wt > 0, ce, 0.0) * wt)  # unscored rows may hold -inf-derived CE

  def dense(_):
    return weighted_ce(flat_hidden, flat_targets, w)

  budget = scoring_budget(b, l, mask_prob) if budget is None else min(int(budget), b * l)
  if budget >= b * l:
    return dense(None), jnp.sum(w), masked
  n_scored = jnp.sum(w > 0)

  def gathered(_):
    rows = jnp.nonzero(w > 0, size=budget, fill_value=0)[0]  # [K] the scored rows, in order
    keep = jnp.arange(budget) < n_scored  # [K] the fill rows count for nothing
    return weighted_ce(flat_hidden[rows], flat_targets[rows], jnp.where(keep, w[rows], 0.0))

  return jax.lax.cond(n_scored <= budget, gathered, dense, None), jnp.sum(w), masked


class ClozeTask(tasks.NextItemTask):
  """BERT4Rec's cloze objective; the encoder's parameters are the whole state.

  Everything but the loss (fields, init, backbone, no constants) is NextItemTask's.
  """

  def __init__(self, config: ml_collections.ConfigDict, split: Any, model: nn.Module,
               workdir: str = ""):
    del workdir
    cfg = model.config
    if not hasattr(cfg, "mask_id"):
      raise ValueError(f"task 'cloze' needs an encoder with a [MASK] row (e.g. bert4rec); "
                       f"config.model.name={config.model.name!r} has none")
    super().__init__(config, split, model)
    self.mask_id = int(cfg.mask_id)
    self.mask_prob = float(cfg.mask_prob)

  def loss(self, params, batch, consts, rng):
    del consts
    loss_sum, weight_sum, masked = cloze_loss(params, batch, rng, model=self.model,
                                              mask_id=self.mask_id, mask_prob=self.mask_prob)
    real = (batch["target_seq"] > 0) & (batch["weights"][:, None] > 0)  # [B, L]
    masked_fraction = jnp.sum(masked & real) / jnp.maximum(jnp.sum(real), 1)
    return loss_sum, weight_sum, {"masked_fraction": masked_fraction.astype(jnp.float32)}


tasks.register("cloze", ClozeTask)
