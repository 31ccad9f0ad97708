"""Up-front validation of an experiment config, with messages that name the offending key."""

from __future__ import annotations

import ml_collections

from seqrec_jax import metrics as metrics_lib

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
  if config.optim.lr <= 0:
    raise ValueError(f"config.optim.lr must be positive, got {config.optim.lr}")
  if config.task.name == "calrec":
    # CALRec reports Recall/NDCG of several rankings; its own module checks its section.
    from calrec_jax.config import validate_calrec  # pylint: disable=g-import-not-at-top
    validate_calrec(config)
    return
  keys = metrics_lib.metric_keys(tuple(config.eval.ks))
  if config.train.early_stop_metric not in keys:
    raise ValueError(f"config.train.early_stop_metric={config.train.early_stop_metric!r} is not "
                     f"one of the evaluated metrics {keys}")
