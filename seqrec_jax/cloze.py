"""The cloze (masked-item) task that trains BERT4Rec.

Each train example's `target_seq` (the window ending with the target item) is masked on device:
every non-padding position is replaced by [MASK] with probability `mask_prob`, and the last
position (the target) always is, so the next-item case that evaluation asks for is trained in
every example (as BERT4Rec's fine-tuning on the appended [MASK]).  The bidirectional encoder
scores every position; cross-entropy counts at the masked positions only.

Registered as task "cloze" on import (`seqrec_jax.tasks` imports this module on demand).
"""

from __future__ import annotations

from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from seqrec_jax import tasks


def _logits_everywhere(module, inputs, train):
  return module.score(module.encode(inputs, train=train))


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
               model: nn.Module, mask_id: int, mask_prob: float, train: bool = True):
  """Masked-item cross-entropy over all items.

  Args:
    backbone_params: encoder parameters.
    batch: target_seq [B, L], weights [B].
    rng: key; split into the masking draw and dropout.
    model: a bidirectional encoder whose table has a [MASK] row `mask_id`.
    mask_id: the [MASK] token id.
    mask_prob: masking probability per non-padding position.
    train: dropout on/off.

  Returns:
    (sum of weighted CE over masked positions, sum of their weights, masked [B, L] bool).
  """
  mask_rng, dropout_rng = jax.random.split(rng)
  targets = batch["target_seq"]  # [B, L]
  masked = cloze_mask(targets, mask_rng, mask_prob)  # [B, L]
  inputs = jnp.where(masked, jnp.asarray(mask_id, targets.dtype), targets)  # [B, L]
  logits = model.apply({"params": backbone_params}, inputs, train, rngs={"dropout": dropout_rng},
                       method=_logits_everywhere)  # [B, L, V]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, L]
  w = batch["weights"][:, None] * masked  # [B, L]
  ce = jnp.where(w > 0, ce, 0.0)  # unmasked/padding positions may hold -inf-derived values
  return jnp.sum(ce * w), jnp.sum(w), masked


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
