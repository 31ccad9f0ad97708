"""The cloze (masked-item) task that trains BERT4Rec.

Each train example's `target_seq` (the window ending with the target item) is masked on device:
every non-padding position is replaced by [MASK] with probability `mask_prob`, and the last
position (the target) always is, so the next-item case that evaluation asks for is trained in
every example (as BERT4Rec's fine-tuning on the appended [MASK]).  The bidirectional encoder
runs over every position; cross-entropy counts at the masked positions only.

Only the masked positions are scored against the item table (the [N, V] output layer dominates
the step): their hidden states are gathered into a static budget of rows.  `ClozeTask` plans it
from the training windows' lengths (`planned_budget`: the masked count of a batch at its mean + 4
standard deviations; on Beauty at batch 256 that is 656 rows where full windows would need 1,344,
`scoring_budget`).  A batch with more masked rows is scored densely, so the loss is exact either
way.  The train step makes that choice outside the gradient (`ClozeTask.select_loss`): a
`lax.cond` inside `jax.grad` runs both branches' residual bookkeeping, which cost as much as the
rows it saved (BENCHMARKS.md §6).

Registered as task "cloze" on import (`seqrec_jax.tasks` imports this module on demand).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, Optional, Sequence

from absl import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from seqrec_jax import tasks


def _encode(module, inputs, train):
  return module.encode(inputs, train=train)


def _score(module, hidden):
  return module.score(hidden)


def scoring_budget(batch: int, length: int, mask_prob: float) -> int:
  """Rows scored per batch when every window is full (`planned_budget` of full windows): the
  masked count of `batch` full-length sequences (the last position always, each other one with
  probability `mask_prob`) at its mean + 4 standard deviations, rounded up to a multiple of 8
  and capped at batch * length."""
  return planned_budget([length], batch, length, mask_prob)


def planned_budget(spans: Sequence[int], batch: int, length: int, mask_prob: float,
                   n_std: float = 4.0) -> int:
  """Rows scored per batch, planned from the data: a batch of `batch` examples drawn from
  windows with `spans` non-padding items each masks 1 + Binomial(span - 1, mask_prob) positions
  per example; the budget is the batch total's mean + `n_std` standard deviations (the spread of
  the drawn windows' lengths and of the Bernoulli draws), rounded up to a multiple of 8 and
  capped at batch * length.  Drawing without replacement only narrows the spread."""
  s = np.minimum(np.asarray(spans, np.float64), length)
  if s.size == 0 or s.min() < 1:
    raise ValueError(f"planned_budget needs windows of >= 1 item, got {s.size} spans "
                     f"(min {s.min() if s.size else None})")
  per = 1.0 + (s - 1.0) * mask_prob  # [n] expected masked positions per window
  mean = batch * per.mean()
  var = batch * (per.var() + ((s - 1.0) * mask_prob * (1.0 - mask_prob)).mean())
  return min(batch * length, int(math.ceil((mean + n_std * math.sqrt(var) + 1.0) / 8.0)) * 8)


def _draw_mask(target_seq: jax.Array, rng: jax.Array, mask_prob: float):
  """`cloze_loss`'s use of its key: (the mask drawn from its first half, the dropout key)."""
  mask_rng, dropout_rng = jax.random.split(rng)
  return cloze_mask(target_seq, mask_rng, mask_prob), dropout_rng


def masked_row_count(batch: Dict[str, jax.Array], rng: jax.Array, mask_prob: float) -> jax.Array:
  """The rows `cloze_loss(..., rng)` scores: masked positions of positive-weight examples."""
  masked, _ = _draw_mask(batch["target_seq"], rng, mask_prob)  # [B, L]
  return jnp.sum(masked & (batch["weights"][:, None] > 0))


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
               budget: Optional[int] = None, mode: str = "cond"):
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
    mode: "cond" picks gathered or dense scoring with a `lax.cond` on the masked count;
      "gathered" scores the budget's rows only (the caller checked that the masked rows fit:
      `masked_row_count`; rows beyond the budget would be dropped); "dense" scores every row.

  Returns:
    (sum of weighted CE over masked positions, sum of their weights, masked [B, L] bool).
  """
  targets = batch["target_seq"]  # [B, L]
  b, l = targets.shape
  masked, dropout_rng = _draw_mask(targets, rng, mask_prob)  # [B, L]
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

  if mode not in ("cond", "gathered", "dense"):
    raise ValueError(f"cloze_loss: unknown mode {mode!r} (cond, gathered or dense)")
  budget = scoring_budget(b, l, mask_prob) if budget is None else min(int(budget), b * l)
  if budget >= b * l or mode == "dense":
    return dense(None), jnp.sum(w), masked
  n_scored = jnp.sum(w > 0)

  def gathered(_):
    rows = jnp.nonzero(w > 0, size=budget, fill_value=0)[0]  # [K] the scored rows, in order
    keep = jnp.arange(budget) < n_scored  # [K] the fill rows count for nothing
    return weighted_ce(flat_hidden[rows], flat_targets[rows], jnp.where(keep, w[rows], 0.0))

  if mode == "gathered":
    return gathered(None), jnp.sum(w), masked
  return jax.lax.cond(n_scored <= budget, gathered, dense, None), jnp.sum(w), masked


class ClozeTask(tasks.NextItemTask):
  """BERT4Rec's cloze objective; the encoder's parameters are the whole state.

  Everything but the loss (fields, init, backbone, no constants) is NextItemTask's.  The scoring
  budget per batch size is planned from the training windows (`planned_budget`; full windows,
  `scoring_budget`, without a split); `select_loss` lets the train step pick gathered or dense
  scoring outside the gradient, and the `cloze_overflow` metric counts the batches scored densely.
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
    self._spans = None
    if split is not None:  # each training target window's non-padding items
      starts = split.dataset.offsets[:-1][split.train_users]
      self._spans = np.minimum(split.train_targets - starts, self.max_len).astype(np.int64)
    self._budgets: Dict[int, int] = {}

  def scoring_rows(self, b: int) -> int:
    """The static scoring budget of a batch of b examples."""
    if b not in self._budgets:
      if self._spans is not None and len(self._spans):
        rows = planned_budget(self._spans, b, self.max_len, self.mask_prob)
        how = f"planned from {len(self._spans)} training windows"
      else:
        rows = scoring_budget(b, self.max_len, self.mask_prob)
        how = "for full windows (no data split)"
      logging.info("cloze: batch %d scores %d of %d rows, %s", b, rows, b * self.max_len, how)
      self._budgets[b] = rows
    return self._budgets[b]

  def loss_in_mode(self, params, batch, consts, rng, *, mode: str = "cond"):
    """The loss with the scoring `mode` of `cloze_loss`; metrics: masked_fraction, and
    cloze_overflow (1 when the batch was scored densely for want of budget)."""
    del consts
    b = batch["target_seq"].shape[0]
    budget = self.scoring_rows(b)
    loss_sum, weight_sum, masked = cloze_loss(params, batch, rng, model=self.model,
                                              mask_id=self.mask_id, mask_prob=self.mask_prob,
                                              budget=budget, mode=mode)
    real = (batch["target_seq"] > 0) & (batch["weights"][:, None] > 0)  # [B, L]
    n_scored = jnp.sum(masked & real)
    masked_fraction = n_scored / jnp.maximum(jnp.sum(real), 1)
    metrics = {"masked_fraction": masked_fraction.astype(jnp.float32)}
    if budget < b * self.max_len:
      over = n_scored > budget if mode == "cond" else jnp.asarray(mode == "dense")
      metrics["cloze_overflow"] = over.astype(jnp.float32)
    return loss_sum, weight_sum, metrics

  def loss(self, params, batch, consts, rng):
    return self.loss_in_mode(params, batch, consts, rng, mode="cond")

  def select_mode(self, batch, rng):
    """(index, modes): 0 ("gathered") when the batch's masked rows fit the budget, else 1
    ("dense"); None when the budget covers every row."""
    b = batch["target_seq"].shape[0]
    budget = self.scoring_rows(b)
    if budget >= b * self.max_len:
      return None
    fits = masked_row_count(batch, rng, self.mask_prob) <= budget
    return jnp.where(fits, 0, 1), ("gathered", "dense")

  def select_loss(self, batch, rng=None):
    """For `train_state.train_step`: the loss to differentiate, chosen outside the gradient."""
    chosen = None if rng is None else self.select_mode(batch, rng)
    if chosen is None:
      return None
    index, modes = chosen
    return index, tuple(functools.partial(self.loss_in_mode, mode=m) for m in modes)


tasks.register("cloze", ClozeTask)
