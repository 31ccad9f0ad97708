"""Up-front validation of an experiment config, with messages that name the offending key."""

from __future__ import annotations

import importlib

import ml_collections

from seqrec_jax import config_diff
from seqrec_jax import metrics as metrics_lib
from seqrec_jax.large_catalog import SOFTMAX_KINDS

# Tasks that validate their own config (and early-stop metric names): "module:function".
_TASK_VALIDATORS = {"calrec": "calrec_jax.config:validate_calrec"}

DATA_FORMATS = ("pairs", "atomic", "p5", "amazon")
REQUIRED = {
    "seed": int, "task.name": str,
    "data.format": str, "data.path": str, "data.max_len": int, "data.short_users": str,
    "model.name": str, "model.loss_positions": str,
    "optim.name": str, "optim.lr": float,
    "train.batch_size": int, "train.num_steps": int, "train.num_epochs": int,
    "train.eval_every_steps": int, "train.log_every_steps": int, "train.patience": int,
    "train.early_stop_metric": str, "train.stop_at_step": int,
    "eval.batch_size": int, "eval.exclude_seen": bool,
    "checkpoint.every_steps": int, "checkpoint.max_to_keep": int, "checkpoint.async_save": bool,
}


def _get(config, dotted):
  node = config
  for part in dotted.split("."):
    if part not in node:
      raise KeyError(f"config is missing the key '{dotted}'")
    node = node[part]
  return node


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError/KeyError naming the key when a config cannot run."""
  for key, kind in REQUIRED.items():
    value = _get(config, key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else \
        isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
      raise ValueError(f"config.{key} must be {kind.__name__}, got {value!r}")
  if config.data.format not in DATA_FORMATS:
    raise ValueError(f"config.data.format={config.data.format!r}; known: {DATA_FORMATS}")
  for key in ("data.max_len", "train.batch_size", "eval.batch_size", "train.log_every_steps"):
    if _get(config, key) <= 0:
      raise ValueError(f"config.{key} must be positive, got {_get(config, key)}")
  if config.train.num_steps <= 0 and config.train.num_epochs <= 0:
    raise ValueError("set config.train.num_steps > 0 or config.train.num_epochs > 0")
  if config.model.loss_positions not in ("last", "all"):
    raise ValueError(f"config.model.loss_positions={config.model.loss_positions!r}; "
                     "allowed: 'last', 'all'")
  _check_softmax(config)
  mode = config.train.get("early_stop_mode", "max")  # absent in configs of older versions
  if mode not in ("max", "min"):
    raise ValueError(f"config.train.early_stop_mode={mode!r}; allowed: 'max', 'min'")
  on_change = config.train.get("on_config_change", "error")  # absent in older configs
  if on_change not in config_diff.ON_CONFIG_CHANGE:
    raise ValueError(f"config.train.on_config_change={on_change!r}; allowed: "
                     f"{config_diff.ON_CONFIG_CHANGE}")
  in_flight = config.train.get("steps_in_flight", 0)  # absent in older configs
  if isinstance(in_flight, bool) or not isinstance(in_flight, int) or in_flight < 0:
    raise ValueError(f"config.train.steps_in_flight must be an int >= 0 (0 = unbounded), got "
                     f"{in_flight!r}")
  if config.optim.lr <= 0:
    raise ValueError(f"config.optim.lr must be positive, got {config.optim.lr}")
  if config.task.name in _TASK_VALIDATORS:
    # Such a task reports metrics of its own (CALRec: Recall/NDCG of several rankings) and
    # checks its own config section; the core names it only by module path.
    module, function = _TASK_VALIDATORS[config.task.name].split(":")
    getattr(importlib.import_module(module), function)(config)
    return
  keys = metrics_lib.metric_keys(tuple(config.eval.ks))
  if config.train.early_stop_metric not in keys:
    raise ValueError(f"config.train.early_stop_metric={config.train.early_stop_metric!r} is not "
                     f"one of the evaluated metrics {keys}")


def _check_softmax(config: ml_collections.ConfigDict) -> None:
  """config.model.softmax and its options (optional keys: older configs mean "full")."""
  model = config.model
  kind = model.get("softmax", "full")
  if kind not in SOFTMAX_KINDS:
    raise ValueError(f"config.model.softmax={kind!r}; allowed: {SOFTMAX_KINDS}")
  for key, kind_of, positive in (("num_negatives", int, True), ("softmax_chunk", int, True),
                                 ("sampling_power", float, False)):
    if key not in model:
      continue
    value = model[key]
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind_of is float else int):
      raise ValueError(f"config.model.{key} must be {kind_of.__name__}, got {value!r}")
    if value < 0 or (positive and value == 0):
      raise ValueError(f"config.model.{key} must be {'positive' if positive else '>= 0'}, "
                       f"got {value}")
  if kind == "full":
    return
  if model.loss_positions != "last":
    raise ValueError(f"config.model.softmax={kind!r} supports config.model.loss_positions='last' "
                     f"only, got {model.loss_positions!r}")
  # Only the next-item task's loss reads the switch; others (cloze, sracl, calrec) would
  # silently train with the full softmax, or (sracl + sampled) miss the proposal constants.
  if config.task.name != "next_item":
    raise ValueError(f"config.model.softmax={kind!r} is implemented for config.task.name="
                     f"'next_item' only, got {config.task.name!r}")
