"""The train state and the pure, top-level train and eval steps (the loss comes from a task)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from seqrec_jax import large_catalog
from seqrec_jax import metrics as metrics_lib
from seqrec_jax import tasks


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


def init_state(rng: jax.Array, *, task: Any, tx: optax.GradientTransformation) -> TrainState:
  """Initialises the task's parameters (still boxed with logical axes) and the optimizer state."""
  params_rng, base_rng = jax.random.split(rng)
  params = task.init_params(params_rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(base_rng))


def train_step(state: TrainState, batch: Dict[str, jax.Array], consts: Dict[str, jax.Array], *,
               task: Any, tx: optax.GradientTransformation):
  """One optimizer step on the task's weighted mean loss.

  Args:
    state: the train state (donated).
    batch: the global batch (fields per `task.train_fields`).
    consts: the task's device-resident arrays.
    task: a `seqrec_jax.tasks` task.
    tx: the optimizer.

  Returns:
    (new state, {"loss_sum", "weight_sum", "grad_norm", **task metrics}).
  """
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

  def value_and_grad(loss):
    def loss_fn(params):
      loss_sum, weight_sum, extra = loss(params, batch, consts, rng)
      return loss_sum / jnp.maximum(weight_sum, 1.0), (loss_sum, weight_sum, extra)
    return jax.value_and_grad(loss_fn, has_aux=True)(state.params)

  # A task may offer equivalent formulations of its loss and pick one per batch (e.g. SRA-CL's
  # length buckets when the batch fits them, the cloze loss's gathered scoring when its masked
  # rows fit the budget): the choice is made outside the gradient, so only the chosen gradient
  # runs and neither carries the other's residuals. It sees the loss's rng (a draw may decide).
  selected = task.select_loss(batch, rng) if hasattr(task, "select_loss") else None
  if selected is None:
    (_, (loss_sum, weight_sum, extra)), grads = value_and_grad(task.loss)
  else:
    index, losses = selected
    (_, (loss_sum, weight_sum, extra)), grads = jax.lax.switch(
        index, [lambda loss=loss: value_and_grad(loss) for loss in losses])
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, {"loss_sum": loss_sum, "weight_sum": weight_sum,
                     "grad_norm": optax.tree.norm(grads), **extra}


def eval_step(backbone_params: Any, batch: Dict[str, jax.Array], *, model: nn.Module,
              ks: Sequence[int] = metrics_lib.DEFAULT_KS, exclude_seen: bool = False,
              blocked_chunk: Optional[int] = None, with_ranks: bool = False):
  """Full-ranking metric sums for one batch (the target is ranked among all items).

  With `with_ranks` it returns `(sums, {"ranks": [B], "targets": [B]})`: each row's 0-based
  target rank too, for per-user comparisons of runs (`loop.final_metrics`).

  With `blocked_chunk` (large catalogues: `config.model.softmax` other than "full") the ranks are
  counted over item blocks of that many rows, sharded over the item axis
  (`large_catalog.sharded_target_ranks`), never holding the [B, V] scores; otherwise the scores
  are materialised and ranked at once.
  """
  exclude = batch["history"] if exclude_seen else None
  # pylint: disable=protected-access
  if blocked_chunk is not None:
    hidden, table = model.apply({"params": backbone_params}, batch["inputs"], False,
                                method=tasks._vector_and_table)  # [B, D], [V, D]
    ranks = large_catalog.sharded_target_ranks(hidden, table, batch["targets"], exclude=exclude,
                                               n_items=model.config.n_items,
                                               chunk_size=blocked_chunk)
  else:
    scores = model.apply({"params": backbone_params}, batch["inputs"], False,
                         method=tasks._logits_at_last)  # [B, V]
    ranks = metrics_lib.target_ranks(scores, batch["targets"], exclude)
  sums = metrics_lib.ranking_sums(ranks, batch["weights"], ks)
  if with_ranks:
    return sums, {"ranks": ranks, "targets": batch["targets"]}
  return sums
