"""The train state and the pure, top-level train / eval steps of next-item prediction."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from seqrec_jax import metrics as metrics_lib


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; saved whole in each checkpoint.

  Attributes:
    step: int32 scalar, number of optimizer steps taken.
    params: model parameters.
    opt_state: optimizer state.
    rng: uint32[2] raw key data of the run's base key; step keys are `fold_in(rng, step)`, so a
      resumed run draws exactly the dropout masks an uninterrupted one would.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def init_state(rng: jax.Array, *, model: nn.Module, tx: optax.GradientTransformation,
               max_len: int) -> TrainState:
  """Initialises parameters (still boxed with logical axes) and optimizer state."""
  params_rng, base_rng = jax.random.split(rng)
  params = model.init({"params": params_rng}, jnp.ones((1, max_len), jnp.int32))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(base_rng))


def _logits_at_last(module, inputs, train):
  return module.score(module(inputs, train=train))


def _logits_everywhere(module, inputs, train):
  return module.score(module.encode(inputs, train=train))


def next_item_loss(params: Any, batch: Dict[str, jax.Array], rng: jax.Array, *,
                   model: nn.Module, loss_positions: str = "last", train: bool = True):
  """Cross-entropy over all items for next-item prediction.

  Args:
    params: model parameters.
    batch: inputs [B, L], targets [B], target_seq [B, L] (for "all"), weights [B].
    rng: dropout key.
    model: the encoder.
    loss_positions: "last" (the SRA-CL reference: CE at the last position only) or "all" (CE at
      every non-padding position against the next item).
    train: dropout on/off.

  Returns:
    (sum of weighted CE, sum of weights): the caller divides, so padding rows count for nothing.
  """
  variables = {"params": params}
  if loss_positions == "last":
    logits = model.apply(variables, batch["inputs"], train, rngs={"dropout": rng},
                         method=_logits_at_last)  # [B, V]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # [B]
    w = batch["weights"]
  elif loss_positions == "all":
    logits = model.apply(variables, batch["inputs"], train, rngs={"dropout": rng},
                         method=_logits_everywhere)  # [B, L, V]
    targets = batch["target_seq"]  # [B, L], 0 where the input is padding
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, L]
    w = batch["weights"][:, None] * (targets > 0)
  else:
    raise ValueError(f"loss_positions must be 'last' or 'all', got {loss_positions!r}")
  ce = jnp.where(w > 0, ce, 0.0)  # padding rows may hold -inf-derived values
  return jnp.sum(ce * w), jnp.sum(w)


def train_step(state: TrainState, batch: Dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, loss_positions: str = "last"):
  """One optimizer step on the weighted mean next-item loss.

  Returns:
    (new state, {"loss_sum", "weight_sum", "grad_norm"}).
  """
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

  def loss_fn(params):
    loss_sum, weight_sum = next_item_loss(params, batch, rng, model=model,
                                          loss_positions=loss_positions)
    return loss_sum / jnp.maximum(weight_sum, 1.0), (loss_sum, weight_sum)

  (_, (loss_sum, weight_sum)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, {"loss_sum": loss_sum, "weight_sum": weight_sum,
                     "grad_norm": optax.tree.norm(grads)}


def eval_step(params: Any, batch: Dict[str, jax.Array], *, model: nn.Module,
              ks: Sequence[int] = metrics_lib.DEFAULT_KS, exclude_seen: bool = False):
  """Full-ranking metric sums for one batch (the target is ranked among all items)."""
  scores = model.apply({"params": params}, batch["inputs"], False, method=_logits_at_last)
  ranks = metrics_lib.target_ranks(scores, batch["targets"],
                                   batch["history"] if exclude_seen else None)
  return metrics_lib.ranking_sums(ranks, batch["weights"], ks)
