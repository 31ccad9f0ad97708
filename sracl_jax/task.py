"""SRA-CL as a task of the shared loop: L = L_rec + alpha * L_CS + beta * L_IS.

  * L_rec: the base task's loss (`config.sracl.rec_task`): cross-entropy over all items for the
    next item (SASRec, GRU4Rec), or the cloze loss for BERT4Rec.
  * L_CS (inter-user): the prefix is encoded a second time (independent dropout) and contrasted,
    NT-Xent, with a positive synthesized from its k semantically retrieved neighbour prefixes:
    each neighbour sequence is encoded by the same backbone (with gradients) and the learnable
    Synthesizer mixes them with attention scored from frozen semantic vectors.
  * L_IS (intra-user): two views of the input, each non-padding item replaced with probability
    `sub_prob` by a random member of its top-k semantic neighbours, contrasted with NT-Xent.

Only the backbone runs at evaluation and serving (`backbone_params`).

Work split: the host gathers, per batch, the neighbour prefixes' input windows and the frozen
semantic vectors (host memory O(n_prefixes x d_sem), device traffic O(batch x k x (L + d_sem)));
the device does every encoder pass, the substitution (`augment.substitute`, vectorised with
jax.random) and the losses.  The item-neighbour table is a device constant.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from seqrec_jax import buckets
from seqrec_jax import tasks
from seqrec_jax.data.batching import gather_windows
from sracl_jax import augment
from sracl_jax import losses
from sracl_jax.synthesizer import Synthesizer


def default_sracl_config() -> ml_collections.ConfigDict:
  """The `config.sracl` section with the reference code's settings."""
  from sracl_jax.semantic.pipeline import default_semantic_config  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict()
  c.rec_task = "next_item"  # task giving L_rec: next_item (SASRec, GRU4Rec) | cloze (BERT4Rec)
  c.alpha = 0.1  # weight of the inter-user term L_CS
  c.beta = 0.1  # weight of the intra-user term L_IS
  c.k = 10  # neighbours used (<= semantic.k)
  c.temperature = 1.0  # NT-Xent temperature (reference: 1.0)
  c.similarity = "dot"  # NT-Xent similarity: dot (reference) | cos
  c.sub_prob = 0.2  # per-item substitution probability of L_IS views
  c.synth_dropout = 0.5  # dropout on the synthesizer's attention weights
  c.synth_gain = 1.414  # Xavier gain of the synthesizer's W and a
  # The paper's ablations (its Table of variants):
  #   synthesizer: learned (the method) | mean (the positive is the plain mean of the k
  #     neighbours' representations: no attention, no dropout; W and a are kept but unused);
  #   neighbours: semantic (the method) | random (both tables replaced by uniformly random OTHER
  #     prefixes / items, drawn once from config.seed) | random_users | random_items (one table).
  c.synthesizer = "learned"
  c.neighbours = "semantic"
  # The L_CS / L_IS encoder passes (and L_rec's, for next-item CE at the last position with the
  # full softmax) run as one call whose rows are sorted by the width their items need and encoded
  # in at most this many static widths (`seqrec_jax.buckets`): the same function, fewer padding
  # columns. 0 = off (one call per pass); -1 = auto: 4 where the
  # backend is CPU and one device holds the batch, off elsewhere (on GPUs the step is
  # launch-bound, so more calls would likely cost more; not measured).
  c.length_buckets = -1
  c.semantic_dir = ""  # tables from launch/embed.py; "" = <workdir>/semantic (built if missing)
  c.semantic = default_semantic_config()
  return c


def shrink_sracl_to_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """SRA-CL's `:tiny` on top of `shrink_to_tiny`: every example runs 2 + k + 2 encoder passes, so
  a shorter window, smaller batches, fewer steps, and one short text per user."""
  c.data.max_len = 20
  c.train.batch_size = 64
  c.train.num_steps = 40
  c.train.eval_every_steps = 20
  c.sracl.semantic.user_mode = "user"
  c.sracl.semantic.max_seq_length = 32
  return c


SYNTHESIZERS = ("learned", "mean")
NEIGHBOURS = ("semantic", "random", "random_users", "random_items")


def random_neighbours(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
  """[n, k] int32: for each row i, k distinct uniformly random indices in [0, n) other than i.
  The random-retrieval ablation's stand-in for a neighbour table."""
  if n < k + 1:
    raise ValueError(f"random neighbours: {k} distinct others need at least {k + 1} rows, got {n}")
  rows = np.arange(n)[:, None]
  out = rng.integers(0, n - 1, size=(n, k))
  out += out >= rows  # skip self: uniform over the n - 1 others
  while True:  # redraw the rows that hold a repeat (rare unless n is close to k)
    s = np.sort(out, axis=1)
    bad = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1))
    if not len(bad):
      break
    redo = rng.integers(0, n - 1, size=(len(bad), k))
    out[bad] = redo + (redo >= bad[:, None])
  return out.astype(np.int32)


class SRACLTask:
  """SRA-CL on any registered backbone encoder."""

  def __init__(self, config: ml_collections.ConfigDict, split: Any, model: Any, workdir: str = ""):
    from sracl_jax.semantic import pipeline  # pylint: disable=g-import-not-at-top
    cfg = config.sracl
    if cfg.k < 1 or cfg.k > cfg.semantic.k:
      raise ValueError(f"config.sracl.k={cfg.k} must be in 1..config.sracl.semantic.k="
                       f"{cfg.semantic.k}")
    if not 0.0 <= cfg.sub_prob <= 1.0:
      raise ValueError(f"config.sracl.sub_prob={cfg.sub_prob} must be in [0, 1]")
    self.model = model
    self.cfg = cfg
    if cfg.synthesizer not in SYNTHESIZERS:
      raise ValueError(f"config.sracl.synthesizer={cfg.synthesizer!r}; expected one of "
                       f"{SYNTHESIZERS}")
    if cfg.neighbours not in NEIGHBOURS:
      raise ValueError(f"config.sracl.neighbours={cfg.neighbours!r}; expected one of {NEIGHBOURS}")
    if cfg.rec_task == "sracl":
      raise ValueError("config.sracl.rec_task cannot be 'sracl'")
    base_config = config.copy_and_resolve_references()
    with base_config.unlocked():
      base_config.task.name = cfg.rec_task
    self.base = tasks.make_task(base_config, split, model)  # gives L_rec
    self.max_len = config.data.max_len
    self.loss_positions = config.model.loss_positions
    self.hidden = model.config.hidden
    out_dir = cfg.semantic_dir or os.path.join(workdir or ".", "semantic")
    # Process 0 builds (or loads) the tables; the others wait and load its files (multi-host runs
    # need the workdir on a shared filesystem, as for checkpoints).
    if jax.process_index() == 0:
      tables = pipeline.build_semantic_tables(split, cfg.semantic, out_dir)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("sracl_semantic_tables")
      if jax.process_index() != 0:
        tables = pipeline.load_tables(out_dir)
    n_train = len(split.train_targets)
    if tables.prefix_embeddings.shape[0] != n_train:
      raise ValueError(f"semantic tables in {out_dir} have {tables.prefix_embeddings.shape[0]} "
                       f"prefix rows but the split has {n_train} training examples")
    if tables.item_neighbours.shape[0] != split.dataset.n_items + 1:
      raise ValueError(f"semantic tables in {out_dir} have {tables.item_neighbours.shape[0]} item "
                       f"rows, expected n_items + 1 = {split.dataset.n_items + 1}")
    self._split = split
    self._items = split.dataset.items
    self._user_start = split.dataset.offsets[:-1]
    self._prefix_emb = np.ascontiguousarray(tables.prefix_embeddings, np.float32)  # [n_train, S]
    self._prefix_nbrs = np.ascontiguousarray(tables.prefix_neighbours[:, :cfg.k])  # [n_train, k]
    item_nbrs = np.ascontiguousarray(tables.item_neighbours[:, :cfg.semantic.k], np.int32)
    if cfg.neighbours in ("random", "random_users"):
      self._prefix_nbrs = random_neighbours(n_train, cfg.k, np.random.default_rng(
          [config.seed, 1]))
    if cfg.neighbours in ("random", "random_items"):
      n_items = split.dataset.n_items
      item_nbrs = np.zeros_like(item_nbrs)
      item_nbrs[1:] = 1 + random_neighbours(n_items, item_nbrs.shape[1], np.random.default_rng(
          [config.seed, 2]))
    self.sem_dim = self._prefix_emb.shape[1]
    self.synthesizer = Synthesizer(features=self.hidden, dropout=cfg.synth_dropout,
                                   gain=cfg.synth_gain)
    # L_rec's own pass joins the bucketed call when it is a function of the last position's
    # vector alone: next-item CE at the last position (the reference's L_rec; SRA-CL runs the
    # full softmax only, `config_check`). BERT4Rec's cloze loss and the all-positions CE read
    # every position and keep their own pass.
    self._rec_rows = bool(cfg.rec_task == "next_item" and self.loss_positions == "last")
    self._setup_buckets(config)
    self.train_fields = dict(tasks.BASE_TRAIN_FIELDS, user_sem=2, nbr_inputs=3, nbr_sem=3)
    self.consts = {"item_neighbours": item_nbrs}  # [n_items + 1, k_sem]
    self.consts_axes = {"item_neighbours": (None, None)}
    logging.info("SRA-CL: alpha=%g beta=%g k=%d synthesizer=%s neighbours=%s, %d prefix vectors "
                 "of dim %d from %s", cfg.alpha, cfg.beta, cfg.k, cfg.synthesizer, cfg.neighbours,
                 n_train, self.sem_dim, out_dir)

  def _setup_buckets(self, config: ml_collections.ConfigDict) -> None:
    """Resolves `sracl.length_buckets`; plans are made per batch size at trace time."""
    n = self.cfg.length_buckets
    if not isinstance(n, int) or n < -1:
      raise ValueError(f"config.sracl.length_buckets={n!r}: expected -1 (auto), 0 (off) or a "
                       "number of widths >= 1")
    if n == -1:
      n = 4 if (jax.default_backend() == "cpu" and jax.device_count() == 1) else 0
    self.length_buckets = n
    self._plans: Dict[int, buckets.Plan] = {}
    self._plan_seed = int(config.seed)
    self._slack = buckets.truncation_slack(self.model)
    split = self._split
    # Items in each training prefix's window (the host's view of the widths rows will need).
    self._spans = np.minimum(
        split.train_targets - self._user_start[split.train_users], self.max_len).astype(np.int64)
    logging.info("SRA-CL: length buckets %s%s", f"up to {n} widths" if n else "off",
                 " (L_rec's pass included)" if n and self._rec_rows else "")

  def bucket_plan(self, b: int) -> buckets.Plan:
    """The static plan for a batch of b examples: rows are [prefix (L_rec), prefix (L_CS), its k
    neighbours (L_CS), two views (L_IS)] as present; capacities from 64 batches drawn like the
    loader's."""
    if b not in self._plans:
      rng = np.random.default_rng([self._plan_seed, 7])
      n_train = len(self._spans)
      samples = []
      for _ in range(64):
        ex = rng.choice(n_train, size=min(b, n_train), replace=False)
        if len(ex) < b:
          ex = np.concatenate([ex, rng.choice(n_train, size=b - len(ex))])
        parts = [self._spans[ex]] if self._rec_rows else []
        if self.cfg.alpha:
          parts += [self._spans[ex], self._spans[self._prefix_nbrs[ex]].ravel()]
        if self.cfg.beta:
          parts += [self._spans[ex], self._spans[ex]]
        samples.append(buckets.required_widths_np(np.concatenate(parts), self.max_len,
                                                  self._slack))
      plan = buckets.make_plan(np.stack(samples), self.max_len, self.length_buckets)
      logging.info("SRA-CL: length buckets for batch %d: %s", b, plan.describe())
      self._plans[b] = plan
    return self._plans[b]

  def bucket_summary(self, b: int) -> Dict[str, Any]:
    """For benchmarks: the length-bucket plan of a batch of b examples ({} when off). Model
    FLOPs elsewhere count every pass at full width; the plan encodes `column_fraction` of those
    columns."""
    if not self._bucketed():
      return {}
    plan = self.bucket_plan(b)
    return {"length_buckets": plan.describe(),
            "length_bucket_column_fraction": plan.cost_fraction()}

  def host_batch(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Adds the neighbour prefixes' input windows and the frozen semantic vectors."""
    examples = batch["examples"]  # [b]
    nbrs = self._prefix_nbrs[examples]  # [b, k]
    ends = self._split.train_targets[nbrs.ravel()]
    starts = self._user_start[self._split.train_users[nbrs.ravel()]]
    b, k = nbrs.shape
    out = dict(batch)
    out["nbr_inputs"] = gather_windows(self._items, ends, starts, self.max_len).reshape(
        b, k, self.max_len)  # [b, k, L]
    out["user_sem"] = self._prefix_emb[examples]  # [b, S]
    out["nbr_sem"] = self._prefix_emb[nbrs]  # [b, k, S]
    return out

  def init_params(self, rng: jax.Array) -> Any:
    backbone_rng, synth_rng = jax.random.split(rng)
    backbone = self.model.init({"params": backbone_rng},
                               jnp.ones((1, self.max_len), jnp.int32))["params"]
    k = self.cfg.k
    synth = self.synthesizer.init(
        synth_rng, jnp.zeros((1, self.sem_dim)), jnp.zeros((1, k, self.sem_dim)),
        jnp.zeros((1, k, self.hidden)), train=False)["params"]
    return {"backbone": backbone, "synthesizer": synth}

  def backbone_params(self, params: Any) -> Any:
    return params["backbone"]

  def encoder_passes(self) -> int:
    """Backbone passes per training example besides L_rec's: the prefix again and its k
    neighbours (L_CS), two views (L_IS)."""
    return (1 + self.cfg.k if self.cfg.alpha else 0) + (2 if self.cfg.beta else 0)

  def train_flops_per_example(self) -> float:
    """Model FLOPs (forward + backward) of one training example: L_rec's pass with its output
    layer, plus `encoder_passes()` backbone passes without one (the synthesizer and NT-Xent
    are O(B k D) and left out)."""
    cfg = self.model.config
    rec = cfg.train_flops_per_sequence(
        "masked" if self.cfg.rec_task == "cloze" else self.loss_positions)
    # The same backbone over a one-item table: the encoder's FLOPs, its output layer ~0.
    encoder = dataclasses.replace(cfg, n_items=1).train_flops_per_sequence("last")
    return float(rec + self.encoder_passes() * encoder)

  def _bucketed(self) -> bool:
    return bool(self.length_buckets and (self._rec_rows or self.cfg.alpha or self.cfg.beta))

  def _rows_need(self, batch) -> jax.Array:
    """[rows] widths the bucketed passes' rows need, in `_loss`'s order. The views' own needs are
    at most their input's (substitution never fills padding), so this bounds them."""
    slack = self._slack
    user = buckets.required_widths(batch["inputs"], slack)
    parts = ([user] if self._rec_rows else []) + ([user, buckets.required_widths(
        batch["nbr_inputs"].reshape(-1, batch["nbr_inputs"].shape[-1]), slack)]
             if self.cfg.alpha else []) + ([user, user] if self.cfg.beta else [])
    return jnp.concatenate(parts)

  def select_loss(self, batch, rng=None):
    """For `train_state.train_step`: the loss to differentiate, chosen outside the gradient, as
    (index, losses); None when there is no choice. Length buckets: the bucketed loss when the
    batch fits the plan, else the per-pass one. A cloze L_rec (with `rng`, the loss's key): its
    gathered scoring when the masked rows fit its budget, else dense scoring. Both choices at
    once give four losses, index = 2 * bucket choice + cloze choice."""
    bucket_modes, bucket_index = ("passes",), jnp.zeros((), jnp.int32)
    if self._bucketed():
      plan = self.bucket_plan(batch["inputs"].shape[0])
      bucket_modes = ("bucketed", "passes")
      bucket_index = jnp.where(buckets.fits(self._rows_need(batch), plan), 0, 1)
    rec_modes, rec_index = (None,), jnp.zeros((), jnp.int32)
    if rng is not None and hasattr(self.base, "select_mode"):
      chosen = self.base.select_mode(batch, _loss_keys(rng)[0])  # L_rec's key in `_loss`
      if chosen is not None:
        rec_index, rec_modes = chosen
    if len(bucket_modes) == 1 and len(rec_modes) == 1:
      return None
    index = bucket_index * len(rec_modes) + rec_index
    return index, tuple(functools.partial(self._loss, mode=m, rec_mode=r)
                        for m in bucket_modes for r in rec_modes)

  def loss(self, params, batch, consts, rng):
    """(weighted total loss sum, weight sum, component metrics); see the module docstring.

    With length buckets on, the passes are bucketed when the batch fits the plan and run one by
    one otherwise (`lax.cond`, correct for any batch; the train step avoids differentiating
    through it with `select_loss`)."""
    return self._loss(params, batch, consts, rng, mode="cond" if self._bucketed() else "passes")

  def _loss(self, params, batch, consts, rng, *, mode: str, rec_mode: Optional[str] = None):
    cfg = self.cfg
    rngs = _loss_keys(rng)
    backbone = params["backbone"]
    weights = batch["weights"]
    metrics = {}
    if mode == "passes" or not self._rec_rows:
      if rec_mode is None:
        rec_sum, weight_sum, rec_metrics = self.base.loss(backbone, batch, {}, rngs[0])
      else:  # the base's scoring mode, chosen by `select_loss` (cloze)
        rec_sum, weight_sum, rec_metrics = self.base.loss_in_mode(backbone, batch, {}, rngs[0],
                                                                  mode=rec_mode)
      if "cloze_overflow" in rec_metrics:
        metrics["cloze_overflow"] = rec_metrics["cloze_overflow"]

    def encode(inputs, key):  # [N, L] -> [N, D] sequence vectors, dropout on
      return self.model.apply({"params": backbone}, inputs, train=True, rngs={"dropout": key})

    inputs = batch["inputs"]
    (b, length), k = inputs.shape, cfg.k
    if cfg.beta:
      table = consts["item_neighbours"]
      view1 = augment.substitute(rngs[4], inputs, table, cfg.sub_prob)
      view2 = augment.substitute(rngs[5], inputs, table, cfg.sub_prob)
    if mode == "passes":
      if cfg.alpha:
        h_user = encode(inputs, rngs[1])  # [B, D]
        h_nbrs = encode(batch["nbr_inputs"].reshape(b * k, length), rngs[2]).reshape(b, k, -1)
      if cfg.beta:
        key1, key2 = jax.random.split(rngs[6])
        h_view1, h_view2 = encode(view1, key1), encode(view2, key2)
      if self._bucketed():
        metrics["bucket_overflow"] = jnp.ones((), jnp.float32)
    elif mode in ("bucketed", "cond"):
      # Every contrastive pass in one call, rows bucketed by width (seqrec_jax.buckets).
      parts = ([inputs] if self._rec_rows else []) + (
          [inputs, batch["nbr_inputs"].reshape(b * k, length)] if cfg.alpha else []) + (
          [view1, view2] if cfg.beta else [])
      rows = jnp.concatenate(parts, axis=0)
      plan = self.bucket_plan(b)
      if mode == "bucketed":  # the caller checked the batch fits (select_loss)
        out = buckets.apply_plan(encode, rows, rngs[1], plan, self._slack)
        overflow = jnp.zeros((), bool)
      else:
        out, overflow = buckets.bucketed_apply(encode, rows, rngs[1], plan, self._slack)
      encoded = buckets.split_rows(out, [p.shape[0] for p in parts])
      metrics["bucket_overflow"] = overflow.astype(jnp.float32)
      if self._rec_rows:  # L_rec from its pass's vectors: `next_item_loss`'s "last" form
        logits = self.model.apply({"params": backbone}, encoded[0],
                                  method=lambda m, h: m.score(h))  # [B, V]
        rec_sum, weight_sum = tasks.last_position_ce(logits, batch["targets"], weights)
      if cfg.alpha:
        first = 1 if self._rec_rows else 0
        h_user, h_nbrs = encoded[first], encoded[first + 1].reshape(b, k, -1)
      if cfg.beta:
        h_view1, h_view2 = encoded[-2], encoded[-1]
    else:
      raise ValueError(f"unknown SRA-CL loss mode {mode!r}")
    rec = rec_sum / jnp.maximum(weight_sum, 1.0)
    total = rec
    metrics["rec_loss"] = rec
    if cfg.alpha:
      if cfg.synthesizer == "mean":
        positive = h_nbrs.mean(axis=1)  # [B, D]
      else:
        positive = self.synthesizer.apply(
            {"params": params["synthesizer"]}, batch["user_sem"], batch["nbr_sem"], h_nbrs,
            train=True, rngs={"dropout": rngs[3]})  # [B, D]
      cs_sum, cs_w = losses.nt_xent(h_user, positive, weights, cfg.temperature, cfg.similarity)
      user_cl = cs_sum / jnp.maximum(cs_w, 1.0)
      total = total + cfg.alpha * user_cl
      metrics["user_cl"] = user_cl
    if cfg.beta:
      is_sum, is_w = losses.nt_xent(h_view1, h_view2, weights, cfg.temperature, cfg.similarity)
      item_cl = is_sum / jnp.maximum(is_w, 1.0)
      total = total + cfg.beta * item_cl
      metrics["item_cl"] = item_cl
    # The loop divides by weight_sum: hand it total * weight_sum.
    return total * weight_sum, weight_sum, metrics


def _loss_keys(rng: jax.Array) -> jax.Array:
  """The 7 keys of `SRACLTask._loss`: L_rec, the prefix, the neighbours, the synthesizer's
  dropout, the two views' substitutions, their encoder passes."""
  return jax.random.split(rng, 7)


tasks.register("sracl", SRACLTask)
