"""CALRec's training task: one decoder, three losses, plugged into the spine's train step.

The task follows the `seqrec_jax.tasks` contract (`train_fields`, `init_params`, `loss`,
`backbone_params`), so `seqrec_jax.train_state.train_step` runs it unchanged under any mesh.

One step runs the decoder twice:
  1. on the serialised history followed by the target item's text (right-padded to a fixed
     length): the logits give L_NIG on the target text; the last-layer states, mean-pooled over
     the history tokens, give v_U, and over the target text tokens, v_T|U;
  2. on the target item's text alone: mean-pooled states give v_T.
The second pass is skipped when both contrastive weights are 0 (L_NIG only).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

import jax
import jax.numpy as jnp

from calrec_jax import losses
from calrec_jax.models import decoder as decoder_lib

TRAIN_FIELDS = {"tokens": 2, "labels": 2, "nig_mask": 2, "user_mask": 2, "target_mask": 2,
                "item_tokens": 2, "item_mask": 2, "weights": 1, "target_ids": 1}


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The loss weights and contrastive settings (from `config.calrec`)."""
  alpha: float = 0.125  # weight of L_TT
  beta: float = 0.025  # weight of L_UT (the brief's -0.025 is an ablation: see README)
  temperature: float = 0.1
  similarity: str = "cosine"  # cosine | dot
  symmetric: bool = False  # also the key -> query InfoNCE direction
  z_loss: float = 0.0  # PaLM's log(Z)^2 regulariser weight
  mask_same_item: bool = True  # rows with the same target item are not each other's negatives

  @classmethod
  def from_config(cls, c) -> "LossConfig":
    return cls(alpha=float(c.alpha), beta=float(c.beta), temperature=float(c.temperature),
               similarity=str(c.similarity), symmetric=bool(c.symmetric), z_loss=float(c.z_loss),
               mask_same_item=bool(c.mask_same_item))


def calrec_loss(params: Any, batch: Dict[str, jax.Array], rng: jax.Array, *,
                model: decoder_lib.Decoder, loss_config: LossConfig, train: bool = True):
  """The weighted CALRec loss of one batch and its parts.

  Args:
    params: decoder parameters.
    batch: TRAIN_FIELDS arrays (see calrec_jax/text/examples.py for their layout).
    rng: dropout key.
    model: the decoder.
    loss_config: weights and contrastive settings.
    train: dropout on/off.

  Returns:
    (total loss scalar, {"nig", "tt", "ut", "z", "target_tokens"}).
  """
  rng_joint, rng_item = jax.random.split(rng)
  variables = {"params": params}
  logits, hidden = model.apply(variables, batch["tokens"], train=train,
                               rngs={"dropout": rng_joint})  # [B, T, V], [B, T, D]
  gen = losses.generation_loss(logits, batch["labels"], batch["nig_mask"], loss_config.z_loss)
  zero = jnp.zeros((), jnp.float32)
  tt = ut = zero
  if loss_config.alpha != 0.0 or loss_config.beta != 0.0:
    item_hidden = model.apply(variables, batch["item_tokens"], train=train,
                              rngs={"dropout": rng_item}, method=model.hidden)  # [B, Ti, D]
    v_t = losses.masked_mean(item_hidden, batch["item_mask"])  # [B, D]
    ids = batch["target_ids"] if loss_config.mask_same_item else None
    kwargs = dict(temperature=loss_config.temperature, similarity=loss_config.similarity,
                  item_ids=ids, symmetric=loss_config.symmetric)
    if loss_config.alpha != 0.0:
      v_tu = losses.masked_mean(hidden, batch["target_mask"])  # [B, D]
      tt = losses.in_batch_info_nce(v_tu, v_t, batch["weights"], **kwargs)
    if loss_config.beta != 0.0:
      v_u = losses.masked_mean(hidden, batch["user_mask"])  # [B, D]
      ut = losses.in_batch_info_nce(v_u, v_t, batch["weights"], **kwargs)
  total = losses.combine(gen["nig"] + gen["z"], tt, ut, loss_config.alpha, loss_config.beta)
  return total, {"nig": gen["nig"], "tt": tt, "ut": ut, "z": gen["z"],
                 "target_tokens": gen["tokens"]}


class CalrecTask:
  """The `seqrec_jax.tasks` contract for CALRec (all parameters are the decoder's)."""

  train_fields = TRAIN_FIELDS

  def __init__(self, model: decoder_lib.Decoder, loss_config: LossConfig, max_tokens: int):
    self.model = model
    self.loss_config = loss_config
    self.max_tokens = max_tokens
    self.consts: Dict[str, Any] = {}
    self.consts_axes: Dict[str, Any] = {}

  def host_batch(self, batch):
    return batch

  def init_params(self, rng: jax.Array) -> Any:
    return self.model.init({"params": rng}, jnp.ones((1, self.max_tokens), jnp.int32))["params"]

  def backbone_params(self, params: Any) -> Any:
    return params

  def loss(self, params, batch, consts, rng):
    del consts
    total, parts = calrec_loss(params, batch, rng, model=self.model, loss_config=self.loss_config)
    rows = jnp.sum((batch["weights"] > 0).astype(jnp.float32))
    # The loop divides loss_sum by weight_sum; scaling by the row count keeps that a mean.
    return total * rows, rows, parts
