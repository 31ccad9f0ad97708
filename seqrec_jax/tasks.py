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
from typing import Any, Callable, Dict, Optional, Tuple

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from seqrec_jax import large_catalog

BASE_TRAIN_FIELDS = {"inputs": 2, "targets": 1, "target_seq": 2, "users": 1, "weights": 1,
                     "examples": 1}


def _logits_at_last(module, inputs, train):
  return module.score(module(inputs, train=train))


def _logits_everywhere(module, inputs, train):
  return module.score(module.encode(inputs, train=train))


def _vector_and_table(module, inputs, train):
  """The [B, D] sequence vector and the [V, D] item table it is scored against (tied output)."""
  return module(inputs, train=train), module.item_embedding.embedding


# Folded into the step's dropout key for the sampled softmax's draws, so that the dropout masks
# are the ones the full softmax would use.
_NEGATIVES_SALT = 0x6E6567


def next_item_loss(backbone_params: Any, batch: Dict[str, jax.Array], rng: jax.Array, *,
                   model: nn.Module, loss_positions: str = "last", train: bool = True,
                   softmax: Optional[large_catalog.SoftmaxConfig] = None,
                   consts: Optional[Dict[str, jax.Array]] = None):
  """Cross-entropy over all items for next-item prediction.

  Args:
    backbone_params: encoder parameters.
    batch: inputs [B, L], targets [B], target_seq [B, L] (for "all"), weights [B].
    rng: dropout key.
    model: the encoder.
    loss_positions: "last" (the SRA-CL reference: CE at the last position only) or "all" (CE at
      every non-padding position against the next item).
    train: dropout on/off.
    softmax: how the softmax normalises (see `large_catalog.SoftmaxConfig`); None = "full", the
      [B, V] logits.  "sharded" and "sampled" need loss_positions="last".
    consts: "sampled" only: {"sampling_cdf": [V], "sampling_log_q": [V]} (`item_proposal`).

  Returns:
    (sum of weighted CE, sum of weights): the caller divides, so padding rows count for nothing.
  """
  variables = {"params": backbone_params}
  kind = softmax.kind if softmax is not None else "full"
  if kind != "full":
    if loss_positions != "last":
      raise ValueError(f"config.model.softmax={kind!r} supports loss_positions='last' only, got "
                       f"{loss_positions!r}; use softmax='full' for the all-positions loss")
    hidden, table = model.apply(variables, batch["inputs"], train, rngs={"dropout": rng},
                                method=_vector_and_table)  # [B, D], [V, D]
    n_items = model.config.n_items
    if kind == "sharded":
      ce = large_catalog.sharded_softmax_cross_entropy(
          hidden, table, batch["targets"], n_items=n_items, chunk_size=softmax.chunk_size)  # [B]
    else:
      if not consts or "sampling_cdf" not in consts:
        raise ValueError("softmax='sampled' needs the task's consts sampling_cdf/sampling_log_q; "
                         "this task passes none to next_item_loss")
      ce = large_catalog.sampled_softmax_loss(
          hidden, table, batch["targets"], jax.random.fold_in(rng, _NEGATIVES_SALT),
          num_negatives=softmax.num_negatives, item_log_q=consts["sampling_log_q"],
          sampling_cdf=consts["sampling_cdf"])  # [B]
    w = batch["weights"]
    ce = jnp.where(w > 0, ce, 0.0)
    return jnp.sum(ce * w), jnp.sum(w)
  if loss_positions == "last":
    logits = model.apply(variables, batch["inputs"], train, rngs={"dropout": rng},
                         method=_logits_at_last)  # [B, V]
    return last_position_ce(logits, batch["targets"], batch["weights"])
  if loss_positions == "all":
    logits = model.apply(variables, batch["inputs"], train, rngs={"dropout": rng},
                         method=_logits_everywhere)  # [B, L, V]
    targets = batch["target_seq"]  # [B, L], 0 where the input is padding
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, L]
    w = batch["weights"][:, None] * (targets > 0)
  else:
    raise ValueError(f"loss_positions must be 'last' or 'all', got {loss_positions!r}")
  ce = jnp.where(w > 0, ce, 0.0)  # padding rows may hold -inf-derived values
  return jnp.sum(ce * w), jnp.sum(w)


def last_position_ce(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """(sum of weighted CE, sum of weights) of [B, V] full-softmax logits against [B] targets:
  `next_item_loss`'s "last" form, for callers that encode the sequences themselves."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B]
  ce = jnp.where(weights > 0, ce, 0.0)  # padding rows may hold -inf-derived values
  return jnp.sum(ce * weights), jnp.sum(weights)


class NextItemTask:
  """Plain next-item prediction: the encoder's parameters are the whole state."""

  train_fields = BASE_TRAIN_FIELDS

  def __init__(self, config: ml_collections.ConfigDict, split: Any, model: nn.Module):
    self.model = model
    self.max_len = config.data.max_len
    self.loss_positions = config.model.loss_positions
    self.softmax = large_catalog.SoftmaxConfig.from_config(config.model)
    if self.softmax.kind != "full" and self.loss_positions != "last":
      raise ValueError(f"config.model.softmax={self.softmax.kind!r} supports "
                       f"config.model.loss_positions='last' only, got {self.loss_positions!r}")
    self.consts: Dict[str, Any] = {}
    self.consts_axes: Dict[str, Tuple] = {}
    if self.softmax.kind == "sampled":
      self.consts, self.consts_axes = _sampling_consts(split, model, self.softmax.sampling_power)

  def host_batch(self, batch: Dict[str, Any]) -> Dict[str, Any]:
    return batch

  def init_params(self, rng: jax.Array) -> Any:
    return self.model.init({"params": rng}, jnp.ones((1, self.max_len), jnp.int32))["params"]

  def backbone_params(self, params: Any) -> Any:
    return params

  def loss(self, params, batch, consts, rng):
    loss_sum, weight_sum = next_item_loss(params, batch, rng, model=self.model,
                                          loss_positions=self.loss_positions,
                                          softmax=self.softmax, consts=consts)
    return loss_sum, weight_sum, {}


def _sampling_consts(split: Any, model: nn.Module, power: float):
  """The sampled softmax's proposal over the item table's rows, from training-target counts.

  Only training targets are counted (validation and test items would leak).  Without a split
  (unit tests building a task alone) the proposal is uniform over items.

  Returns:
    ({"sampling_cdf": [V], "sampling_log_q": [V]} float32 numpy arrays, their logical axes).
    Both are replicated: the sampler binary-searches the whole CDF on every device.
  """
  n_items = model.config.n_items
  if split is not None:
    targets = split.dataset.items[split.train_targets]
    counts = np.bincount(targets, minlength=n_items + 1)[:n_items + 1]  # [n_items + 1]
  else:
    logging.warning("softmax='sampled' without a data split: uniform proposal over items")
    counts, power = np.zeros(n_items + 1), 0.0
  cdf, log_q = large_catalog.item_proposal(counts, power, model.config.table_rows)
  return ({"sampling_cdf": cdf, "sampling_log_q": log_q},
          {"sampling_cdf": (None,), "sampling_log_q": (None,)})


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
