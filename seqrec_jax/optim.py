"""Optimizers from config: Adam/AdamW with optional warm-up, decay schedule and clipping."""

from __future__ import annotations

import ml_collections
import optax

_SCHEDULES = ("constant", "cosine", "linear")


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up over `cfg.warmup_steps`, then constant, cosine or linear decay to 0."""
  if cfg.schedule not in _SCHEDULES:
    raise ValueError(f"config.optim.schedule={cfg.schedule!r}; allowed: {_SCHEDULES}")
  warmup = int(cfg.warmup_steps)
  decay_steps = max(1, total_steps - warmup)
  if cfg.schedule == "constant":
    after = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(cfg.lr, decay_steps)
  else:
    after = optax.linear_schedule(cfg.lr, 0.0, decay_steps)
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """Builds the optimizer named by `cfg.name` ("adam" or "adamw").

  Args:
    cfg: `config.optim` (name, lr, b1, b2, eps, weight_decay, grad_clip, warmup_steps, schedule).
    total_steps: the run's planned number of steps (for decay schedules).

  Returns:
    An optax GradientTransformation.
  """
  lr = learning_rate_schedule(cfg, total_steps)
  if cfg.name == "adam":
    if cfg.weight_decay:
      raise ValueError("config.optim.weight_decay is set but config.optim.name='adam'; use 'adamw'")
    opt = optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  elif cfg.name == "adamw":
    opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  else:
    raise ValueError(f"config.optim.name={cfg.name!r}; allowed: 'adam', 'adamw'")
  if cfg.grad_clip and cfg.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
  return opt
