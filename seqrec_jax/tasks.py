"""Training tasks: what a train step optimises, on top of a sequence encoder.

A task owns everything method-specific, so the loop, the sharding and the checkpoints stay the
same for SASRec, SRA-CL, or a new method:

  * `train_fields`: the train batch's fields and their ranks (for input shardings);
  * `host_batch(batch)`: adds fields on the host (e.g. SRA-CL's neighbour sequences);
  * `consts` / `consts_axes`: device-resident arrays the loss reads (e.g. an item-neighbour
    table), passed to the jitted step as arguments, never baked into the program;
  * `init_params(rng)`: the trainable parameters (logically boxed);
  * `loss(params, batch, consts, rng)`: (weighted loss sum, weight sum, extra scalar metrics);
  * `backbone_params(params)`: the encoder's parameters, which evaluation and serving use.

Tasks are looked up by `config.task.name`; SRA-CL registers itself from `sracl_jax.task`.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

BASE_TRAIN_FIELDS = {"inputs": 2, "targets": 1, "target_seq": 2, "users": 1, "weights": 1,
                     "examples": 1}


def _logits_at_last(module, inputs, train):
  return module.score(module(inputs, train=train))


def _logits_everywhere(module, inputs, train):
  return module.score(module.encode(inputs, train=train))


def next_item_loss(backbone_params: Any, batch: Dict[str, jax.Array], rng: jax.Array, *,
                   model: nn.Module, loss_positions: str = "last", train: bool = True):
  """Cross-entropy over all items for next-item prediction.

  Args:
    backbone_params: encoder parameters.
    batch: inputs [B, L], targets [B], target_seq [B, L] (for "all"), weights [B].
    rng: dropout key.
    model: the encoder.
    loss_positions: "last" (the SRA-CL reference: CE at the last position only) or "all" (CE at
      every non-padding position against the next item).
    train: dropout on/off.

  Returns:
    (sum of weighted CE, sum of weights): the caller divides, so padding rows count for nothing.
  """
  variables = {"params": backbone_params}
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


class NextItemTask:
  """Plain next-item prediction: the encoder's parameters are the whole state."""

  train_fields = BASE_TRAIN_FIELDS

  def __init__(self, config: ml_collections.ConfigDict, split: Any, model: nn.Module):
    self.model = model
    self.max_len = config.data.max_len
    self.loss_positions = config.model.loss_positions
    self.consts: Dict[str, Any] = {}
    self.consts_axes: Dict[str, Tuple] = {}

  def host_batch(self, batch: Dict[str, Any]) -> Dict[str, Any]:
    return batch

  def init_params(self, rng: jax.Array) -> Any:
    return self.model.init({"params": rng}, jnp.ones((1, self.max_len), jnp.int32))["params"]

  def backbone_params(self, params: Any) -> Any:
    return params

  def loss(self, params, batch, consts, rng):
    del consts
    loss_sum, weight_sum = next_item_loss(params, batch, rng, model=self.model,
                                          loss_positions=self.loss_positions)
    return loss_sum, weight_sum, {}


_TASKS: Dict[str, Callable[..., Any]] = {"next_item": NextItemTask}
# Tasks defined outside the core register on import of their module.
_TASK_MODULES = {"sracl": "sracl_jax.task", "cloze": "seqrec_jax.cloze"}


def register(name: str, factory: Callable[..., Any]) -> None:
  _TASKS[name] = factory


def make_task(config: ml_collections.ConfigDict, split: Any, model: nn.Module, workdir: str = ""):
  """Builds the task named by `config.task.name`."""
  name = config.task.name
  if name not in _TASKS and name in _TASK_MODULES:
    importlib.import_module(_TASK_MODULES[name])
  if name not in _TASKS:
    raise ValueError(f"config.task.name={name!r} is unknown; known: "
                     f"{sorted(set(_TASKS) | set(_TASK_MODULES))}")
  factory = _TASKS[name]
  try:
    return factory(config, split, model, workdir=workdir)
  except TypeError:
    return factory(config, split, model)
