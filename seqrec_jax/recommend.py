"""Serving a trained workdir: batch top-K per user, a Python API, and embedding / ScaNN export.

  rec = Recommender.from_workdir(workdir)          # best checkpoint + config.json, loaded once
  rec.recommend(["B0001", "B0042"], k=10)          # one history (a new user): Recommendation
  rec.recommend([["B0001"], ["B0042", "B0007"]])   # a batch of histories: list of Recommendation
  rec.write_topk("recs.jsonl", k=100)              # every user (or `users=[...]`) to JSONL
  rec.export("export/")                            # item / user vectors + a ScaNN index

What a user's recommendation is.  The encoder reads the user's *whole* sequence (training part,
validation and test items: everything the dataset holds), the last `max_len` items of it, so the
prediction is the item after the last one.  Every item of the catalogue is scored inside jit
(`model.logits`, the scores of `model.score` before masking), then the K best are picked:
`large_catalog.grouped_top_k`, which equals `jax.lax.top_k` of `model.score` (ties included) and is
faster at large catalogues.  Padding id 0 and the table's filler rows are masked inside it (they
score -inf and are never returned) so that no masked copy of the [B, V] scores is written.  With `exclude_seen`, every item of the whole history (not
only the max_len window) is set to -inf first.  Rows whose candidates run out (a history covering
the catalogue) are shorter than K: -inf entries are dropped.

Ties: `jax.lax.top_k` returns equal scores in ascending index order, so among items with exactly
the same float32 score the lower dense id (the item that appears first in the dataset's numbering)
comes first.  This is the order of a stable numpy `argsort(-scores)` (tested).

Batches are global over all processes and sharded over the mesh by the workdir's Partitioner:
process p encodes rows [p * G / P, (p + 1) * G / P) of every global batch of G users; the small
[G, K] result is replicated, and each process writes its own rows.  Host memory is O(G x K) per
batch (plus the dataset), never O(users x items); device memory O(G x items) for the scores.

Output files are written to `<file>.tmp` and renamed when complete, next to a `<file>.meta.json`
that records the settings; a rerun with the same settings skips a complete file, and a killed run
leaves only a `.tmp` that the next run overwrites.  In a multi-process run each process writes
`<stem>-<p:05d>-of-<P:05d><ext>` (e.g. recs-00000-of-00002.jsonl).

CALRec workdirs (a text decoder) are served by `calrec_jax.recommend.CalrecRecommender`, which has
the same API and file format and reuses this module's id, writer and sharding helpers.

Is the model's score a dot product with an item table?  For the three encoders, yes:
  * SASRec: `score(v) = mask(v @ item_embedding.T)` (tied output layer, no bias); the user vector
    is the last position's hidden state.
  * GRU4Rec: the same `Embed.attend` dot product; the user vector is the GRU state after the last
    item passed through the `out` dense layer (so it lives in the item-embedding space).
  * BERT4Rec: SASRec's `score`; the table has an extra [MASK] row (id n_items + 1) that scores
    -inf and is not exported; the user vector is the output at an appended [MASK] position (the
    oldest window position is dropped to make room, as in training).
With compute dtype bfloat16 the model scores `bf16(v) . bf16(table)`; the export keeps float32
vectors, so exported dot products equal the model's scores only up to bfloat16 rounding.  `export`
verifies the dot-product identity numerically on a sample of users and refuses to write an index
for a model whose scores are something else.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from seqrec_jax import ann
from seqrec_jax import checkpointing
from seqrec_jax import fileio
from seqrec_jax import large_catalog
from seqrec_jax import loop
from seqrec_jax import models
from seqrec_jax import sharding
from seqrec_jax.data.batching import gather_windows

FORMAT_VERSION = 1
ON_UNKNOWN = ("error", "drop")
EXPORT_MANIFEST = "export.json"
_MIN_HISTORY_BUCKET = 8


class UnknownIdError(ValueError):
  """Item or user ids that the workdir's dataset does not contain."""


@dataclasses.dataclass(frozen=True)
class Recommendation:
  """Top-K items of one history, best first.

  Attributes:
    items: original item ids.
    scores: the model's float32 scores of those items (dot products, see the module docstring).
  """
  items: List[str]
  scores: List[float]

  def to_dict(self) -> Dict[str, Any]:
    return {"items": list(self.items), "scores": list(self.scores)}


def shard_path(path: str, process_index: int, process_count: int) -> str:
  """`recs.jsonl` -> `recs-00001-of-00004.jsonl` when there are several processes.

  Args:
    path: the requested output file.
    process_index: this process.
    process_count: number of processes; 1 keeps `path` unchanged.

  Returns:
    The file this process writes.
  """
  if process_count <= 1:
    return path
  stem, ext = os.path.splitext(path)
  return f"{stem}-{process_index:05d}-of-{process_count:05d}{ext}"


def read_id_file(path: str) -> List[str]:
  """Original ids, one per line (blank lines skipped, surrounding whitespace stripped)."""
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def dense_item_ids(history: Sequence[Any], index: Dict[str, int], on_unknown: str = "error",
                   what: str = "history", source: str = "") -> np.ndarray:
  """Original item ids -> [n] int32 dense ids, through an {original id: dense id} map.

  Shared by every recommender of a workdir (item-id encoders and CALRec), so unknown ids are
  reported the same way whatever the model.

  Args:
    history: original item ids (str; ints are compared as their str).
    index: original id -> dense id (> 0).
    on_unknown: "error" raises UnknownIdError naming them; "drop" drops them (count logged).
    what: how to name this history in messages.
    source: where the ids come from (the workdir), for messages.

  Returns:
    The dense ids, in order.

  Raises:
    UnknownIdError: unknown ids with on_unknown="error".
    ValueError: an empty history (before or after dropping), or a bad on_unknown.
  """
  if on_unknown not in ON_UNKNOWN:
    raise ValueError(f"on_unknown must be one of {ON_UNKNOWN}, got {on_unknown!r}")
  ids = [index.get(str(x), 0) for x in history]
  unknown = [str(x) for x, i in zip(history, ids) if i == 0]
  if unknown:
    if on_unknown == "error":
      shown = sorted(set(unknown))
      raise UnknownIdError(
          f"{what}: {len(shown)} unknown item id(s) not in the training data of "
          f"{source}: {shown[:20]}{' ...' if len(shown) > 20 else ''}; pass "
          "on_unknown='drop' to ignore them")
    logging.info("%s: dropped %d unknown item id(s) of %d", what, len(unknown), len(ids))
  dense = np.asarray([i for i in ids if i], dtype=np.int32)
  if dense.size == 0:
    raise ValueError(f"{what} is empty" + (f" after dropping {len(unknown)} unknown item id(s)"
                                           if unknown else "") + ": nothing to recommend from")
  return dense


def dense_user_ids(users: Sequence[Any], index: Dict[str, int], source: str = "") -> np.ndarray:
  """Original user ids -> [n] int64 user indices (order kept); unknown ids raise, naming them."""
  idx = [index.get(str(u), -1) for u in users]
  unknown = [str(u) for u, i in zip(users, idx) if i < 0]
  if unknown:
    raise UnknownIdError(f"{len(unknown)} unknown user id(s) not in the data of {source}: "
                         f"{unknown[:20]}{' ...' if len(unknown) > 20 else ''}")
  return np.asarray(idx, dtype=np.int64)


def split_histories(history: Any) -> Tuple[bool, List[Sequence[Any]]]:
  """(single, histories): one history (a list of ids) or a batch of them (a list of lists).

  Raises:
    TypeError: a str, which would otherwise read as a history of one-character ids.
  """
  if isinstance(history, str):
    raise TypeError(f"history must be a list of item ids (or a list of lists), got the str "
                    f"{history!r}")
  single = len(history) == 0 or not _is_sequence(history[0])
  return single, ([history] if single else list(history))


def shape_bucket(n: int, minimum: int = _MIN_HISTORY_BUCKET) -> int:
  """The power of two >= max(n, minimum): few distinct shapes, so few compilations."""
  return 1 << max(int(minimum) - 1, int(n) - 1, 0).bit_length()


def _user_vector(module, inputs):
  """[B, L] ids -> [B, D] sequence vectors (dropout off)."""
  return module(inputs, train=False)


def _scores(module, inputs):
  """[B, L] ids -> [B, table_rows] float32 scores; non-item rows are -inf."""
  return module.score(module(inputs, train=False))


def _logits(module, inputs):
  """[B, L] ids -> [B, table_rows] unmasked dot products (compute dtype), for `topk_step`."""
  return module.logits(module(inputs, train=False))


def _item_table(module):
  """The [table_rows, D] embedding table `score` takes dot products with."""
  if not hasattr(module, "item_embedding"):
    raise ValueError(f"{type(module).__name__} has no item_embedding table to export")
  return module.item_embedding.embedding


def topk_step(params: Any, batch: Dict[str, jax.Array], *, model: nn.Module, k: int,
              exclude_seen: bool) -> Tuple[jax.Array, jax.Array]:
  """Top-K items of one batch of windows, inside jit.

  Args:
    params: encoder parameters.
    batch: `inputs` [B, L] int32 windows (left-padded); with exclude_seen also `history` [B, H]
      int32 item ids to remove (0 entries are padding and already -inf).
    model: the encoder.
    k: K (<= table rows).
    exclude_seen: set the scores of `history` items to -inf before the top-K.

  Returns:
    (ids [B, K] int32 dense item ids, scores [B, K] float32), best first; equal scores in
    ascending id order (`jax.lax.top_k`).  Entries past a row's candidates have score -inf.
  """
  # Unmasked dot products: the padding and filler rows are masked inside grouped_top_k, which
  # spares a full masked copy of [B, V] (on CPU as slow as the top-k itself at 1M items).
  scores = model.apply({"params": params}, batch["inputs"], method=_logits)  # [B, V]
  if exclude_seen:
    rows = jnp.arange(scores.shape[0])[:, None]  # [B, 1]
    scores = scores.at[rows, batch["history"]].set(-jnp.inf)  # [B, V]
  top_scores, top_ids = large_catalog.grouped_top_k(
      scores, k, valid=(1, model.config.n_items + 1))  # [B, K], [B, K]
  return top_ids, top_scores.astype(jnp.float32)


def vectors_step(params: Any, batch: Dict[str, jax.Array], *, model: nn.Module) -> jax.Array:
  """[B, L] windows -> [B, D] float32 user vectors."""
  return model.apply({"params": params}, batch["inputs"], method=_user_vector).astype(jnp.float32)


def scores_step(params: Any, batch: Dict[str, jax.Array], *, model: nn.Module) -> jax.Array:
  """[B, L] windows -> [B, table_rows] float32 scores (for checks on small samples)."""
  return model.apply({"params": params}, batch["inputs"], method=_scores)


def id_lookups(dataset: Any) -> Tuple[Dict[str, int], Dict[str, int], np.ndarray]:
  """(item id -> dense id (padding 0 left out), user id -> row, JSON-quoted item ids [V])."""
  item_index = {str(s): i for i, s in enumerate(dataset.item_ids) if i > 0}
  user_index = {str(s): i for i, s in enumerate(dataset.user_ids)}
  item_json = np.asarray([json.dumps(str(s)) for s in dataset.item_ids], dtype=object)
  return item_index, user_index, item_json


def global_batch(batch_size: int, partitioner: Any) -> Tuple[int, int]:
  """(row multiple, batch_size rounded up to it): global batches split evenly over the mesh's
  batch shards and over the processes."""
  multiple = int(np.lcm(partitioner.batch_size_multiple, jax.process_count()))
  return multiple, -(-int(batch_size) // multiple) * multiple


def select_users(dataset: Any, users: Optional[Sequence[Any]],
                 user_index: Callable[[List[str]], np.ndarray]) -> np.ndarray:
  """Dataset rows of `users` (original ids; duplicates dropped, order kept; None = every user),
  less the users with an empty sequence (their count is logged).  Unknown ids raise through
  `user_index`."""
  if users is None:
    user_idx = np.arange(dataset.n_users, dtype=np.int64)
  else:
    user_idx = user_index(list(dict.fromkeys(str(u) for u in users)))
  lengths = dataset.lengths[user_idx]
  if np.any(lengths == 0):
    logging.warning("skipping %d users with an empty sequence", int(np.sum(lengths == 0)))
    user_idx = user_idx[lengths > 0]
  return user_idx


def output_settings(workdir: str, best_step: Any, k: int, exclude_seen: bool,
                    decimals: Optional[int], user_ids: np.ndarray, global_batch_size: int,
                    **extra: Any) -> Dict[str, Any]:
  """The settings a top-K file records (`<file>.meta.json`); a rerun skips a complete file only
  when they are equal.  The global batch decides which users each process's shard holds, so it
  is part of them: a rerun never mixes shards of two different splits."""
  return {
      "format_version": FORMAT_VERSION, "workdir": workdir, "best_step": best_step, **extra,
      "k": k, "exclude_seen": bool(exclude_seen), "decimals": decimals,
      "users_sha1": hashlib.sha1("\n".join(user_ids).encode()).hexdigest(),
      "n_users": int(len(user_ids)), "process_index": jax.process_index(),
      "process_count": jax.process_count(), "global_batch": global_batch_size,
  }


def process_batches(items: np.ndarray, starts: np.ndarray, ends: np.ndarray, global_batch: int,
                    max_len: int, with_history: bool = False
                    ) -> Iterator[Tuple[int, int, np.ndarray, Optional[np.ndarray]]]:
  """This process's slice of each global batch of sequences `items[starts[i]:ends[i]]`.

  Every process passes the same (items, starts, ends) and gets its own rows of each global batch
  (as `data.eval_batches` does); the last batch is padded by repeating its first row.

  Yields:
    (first global row, number of real rows, last `max_len` items of each local row [G/P, L],
     the whole histories [G/P, H] or None). H is a power-of-two bucket of the longest history in
     the *global* batch, so every process builds arrays of the same width.
  """
  n = len(starts)
  procs, me = jax.process_count(), jax.process_index()
  if global_batch % procs:
    raise ValueError(f"global batch {global_batch} is not divisible by {procs} processes")
  local = global_batch // procs
  mine = slice(me * local, (me + 1) * local)
  for lo in range(0, n, global_batch):
    s, e = starts[lo:lo + global_batch], ends[lo:lo + global_batch]  # [<=G]
    real = len(s)
    if real < global_batch:
      s = np.concatenate([s, np.full(global_batch - real, s[0], s.dtype)])  # [G]
      e = np.concatenate([e, np.full(global_batch - real, e[0], e.dtype)])  # [G]
    windows = gather_windows(items, e[mine], s[mine], max_len)  # [G/P, L]
    history = None
    if with_history:
      width = shape_bucket(int(np.max(e - s)))
      history = gather_windows(items, e[mine], s[mine], width)  # [G/P, H]
    yield lo, real, windows, history


def fetch(x: jax.Array) -> np.ndarray:
  """The host copy of a replicated global array (works when other processes hold devices too)."""
  return np.asarray(x.addressable_data(0))


def _find_subtree(saved: Any, wanted: Any) -> Optional[Tuple[str, ...]]:
  """Path of the subtree of `saved` with `wanted`'s structure and leaf shapes (root first)."""

  def same(a, b):
    if jax.tree.structure(a) != jax.tree.structure(b):
      return False
    return all(tuple(x.shape) == tuple(y.shape) for x, y in zip(jax.tree.leaves(a),
                                                                   jax.tree.leaves(b)))

  if same(saved, wanted):
    return ()
  if isinstance(saved, dict):
    for key in sorted(saved, key=lambda k: k != "backbone"):
      if same(saved[key], wanted):
        return (key,)
  return None


def _shapes(tree: Any) -> Dict[str, Tuple[int, ...]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in flat}


def restore_best_backbone(workdir: str, model: nn.Module,
                          partitioner: sharding.Partitioner) -> Tuple[Any, Any, int]:
  """Restores the encoder's parameters of a workdir's best checkpoint onto `partitioner`'s mesh.

  The best checkpoint holds the *task's* parameters: the encoder's alone (next_item, cloze) or the
  encoder's under `backbone` next to method-specific ones (SRA-CL's synthesizer), which is what
  `task.backbone_params` selects.  Building the task here would load (or, if missing, rebuild)
  SRA-CL's semantic tables that serving never reads, so the encoder's subtree is found from the
  checkpoint's metadata instead: the subtree whose structure and shapes equal the encoder's own.
  The encoder's leaves get their logical shardings on this mesh, any others are replicated.

  Args:
    workdir: the workdir (its best/ folder).
    model: the encoder built for the workdir's dataset.
    partitioner: the mesh to restore onto.

  Returns:
    (encoder params, their shardings, best step).

  Raises:
    FileNotFoundError: no best checkpoint.
    ValueError: no subtree of the checkpoint fits the encoder (data or model changed).
  """
  best_dir = os.path.join(workdir, "best")
  ckpt = checkpointing.Checkpointer(workdir, max_to_keep=1, async_save=False)
  try:
    step = ckpt.best_step()
    if step is None:
      raise FileNotFoundError(f"no best checkpoint under {best_dir}: the run has not finished an "
                              "evaluation yet (or this is not a launch/train.py workdir)")
    saved = ckpt.best_params_metadata(step)
    with partitioner.context():
      boxed = jax.eval_shape(
          lambda: model.init({"params": jax.random.key(0)},
                             jnp.ones((1, model.config.max_len), jnp.int32))["params"])
      enc_shardings = partitioner.logical_shardings(boxed)
    enc_abstract = nn.meta.unbox(boxed)
    path = _find_subtree(saved, enc_abstract)
    if path is None:
      got, want = _shapes(saved), _shapes(enc_abstract)
      diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
      raise ValueError(
          f"the best checkpoint {os.path.join(best_dir, str(step))} does not hold parameters of "
          f"the model config.json describes for the current data (checkpoint vs expected shapes, "
          f"first differences: {dict(list(diff.items())[:4])}); did the data file "
          "or the code version change since training?")
    replicated = partitioner.replicated
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          saved)
    enc_target = partitioner.abstract_with_shardings(enc_abstract, enc_shardings)
    if path:
      target = dict(target)
      target[path[0]] = enc_target
    else:
      target = enc_target
    params, _ = ckpt.restore_best(target)
  finally:
    ckpt.close()
  if path:
    params = params[path[0]]
  return params, enc_shardings, int(step)


class Recommender:
  """A workdir's best model, ready to rank the whole catalogue for any history.

  Build it with `Recommender.from_workdir`.  Attributes are read-only in spirit:
    workdir, config, model, params (sharded encoder parameters), partitioner, dataset,
    best_step, batch_size, n_items, item_ids (original ids by dense id, [0] = "[PAD]"),
    user_ids (original ids by user index).
  """

  def __init__(self, *, workdir: str, config: ml_collections.ConfigDict, model: nn.Module,
               params: Any, param_shardings: Any, partitioner: sharding.Partitioner,
               dataset: Any, best_step: int, batch_size: int):
    self.workdir = workdir
    self.config = config
    self.model = model
    self.params = params
    self.param_shardings = param_shardings
    self.partitioner = partitioner
    self.dataset = dataset
    self.best_step = best_step
    self.max_len = int(model.config.max_len)
    self.n_items = int(dataset.n_items)
    self.item_ids = np.asarray(dataset.item_ids, dtype=object)
    self.user_ids = np.asarray(dataset.user_ids, dtype=object)
    self._item_index, self._user_index, self._item_json = id_lookups(dataset)
    self._row_multiple, self.batch_size = global_batch(batch_size, partitioner)
    self._steps: Dict[Any, Callable] = {}

  # -------------------------------------------------------------------------------------------
  # Loading.

  @classmethod
  def from_workdir(cls, workdir: str, *, batch_size: Optional[int] = None,
                   mesh_shape: Optional[Dict[str, int]] = None) -> "Recommender":
    """Loads config.json, the dataset and the best checkpoint of a training workdir, once.

    Args:
      workdir: a workdir written by `launch/train.py` (`loop.train_and_evaluate`).
      batch_size: global rows per device batch; default `config.eval.batch_size` (rounded up to
        the mesh's batch shards x processes).
      mesh_shape: override `config.mesh.shape` (e.g. {"data": -1}) when serving on other
        hardware than training; default: the training mesh description.

    Returns:
      A Recommender.

    Raises:
      FileNotFoundError: no config.json, no best checkpoint, or the dataset file is gone.
      ValueError: a config of another version (missing keys), or a checkpoint that does not fit.
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = loop.load_workdir_config(workdir)  # names config.json in its errors
    if config.task.name == "calrec":
      # A text decoder: no item table to score with; its own recommender has the same API.
      raise ValueError(f"{os.path.join(workdir, 'config.json')}: a CALRec workdir; serve it with "
                       "calrec_jax.recommend.CalrecRecommender (launch/recommend.py dispatches)")
    best_dir = os.path.join(workdir, "best")
    if not os.path.isdir(best_dir) or not any(d.isdigit() for d in os.listdir(best_dir)):
      raise FileNotFoundError(f"no best checkpoint under {best_dir}: the run has not finished an "
                              "evaluation yet (or this is not a launch/train.py workdir)")
    config_path = os.path.join(workdir, "config.json")
    mesh_config = config.mesh
    if mesh_shape is not None:
      mesh_config = ml_collections.ConfigDict(config.mesh.to_dict())
      mesh_config.shape = dict(mesh_shape)
      mesh_config.num_devices = -1
    partitioner = sharding.partitioner_from_config(mesh_config)
    dataset = loop.load_split(config).dataset
    try:
      model, _ = models.build_model(config.model, n_items=dataset.n_items,
                                    max_len=config.data.max_len)
    except (KeyError, TypeError, ValueError) as e:
      # E.g. a config from another version, or a task whose model is not an item-id encoder.
      raise ValueError(f"{config_path}: cannot serve task {config.task.name!r} with model "
                       f"{config.model.name!r} (an item-id encoder of this version of seqrec_jax "
                       f"is needed): {e}") from e
    params, shardings, step = restore_best_backbone(workdir, model, partitioner)
    logging.info("recommender: %s at best step %d of %s (%s)", config.model.name, step, workdir,
                 dataset.summary())
    return cls(workdir=workdir, config=config, model=model, params=params,
               param_shardings=shardings, partitioner=partitioner, dataset=dataset,
               best_step=step, batch_size=batch_size or int(config.eval.batch_size))

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, dataset: Any, *, params: Any = None,
                  seed: int = 0, batch_size: Optional[int] = None) -> "Recommender":
    """A Recommender without a workdir: given or randomly initialised parameters.

    For benchmarks (speed does not depend on training) and tests.

    Args:
      config: an experiment config (its model, data.max_len and mesh sections are read).
      dataset: the SequenceDataset whose users and items it serves.
      params: host encoder parameters to serve; default the model's own random init.
      seed: parameter initialisation seed (without `params`).
      batch_size: as in `from_workdir`.

    Returns:
      A Recommender with best_step -1.
    """
    partitioner = sharding.partitioner_from_config(config.mesh)
    model, _ = models.build_model(config.model, n_items=dataset.n_items,
                                  max_len=config.data.max_len)
    init = lambda key: model.init({"params": key},  # pylint: disable=g-long-lambda
                                  jnp.ones((1, config.data.max_len), jnp.int32))["params"]
    if params is None:
      params, shardings = partitioner.partition_init(init, jax.random.key(seed))
    else:
      with partitioner.context():
        shardings = partitioner.logical_shardings(jax.eval_shape(init, jax.random.key(seed)))
      params = jax.device_put(params, shardings)
    return cls(workdir="", config=config, model=model, params=params, param_shardings=shardings,
               partitioner=partitioner, dataset=dataset, best_step=-1,
               batch_size=batch_size or int(config.eval.batch_size))

  # -------------------------------------------------------------------------------------------
  # Ids.

  def item_index(self, history: Sequence[Any], on_unknown: str = "error",
                 what: str = "history") -> np.ndarray:
    """Original item ids -> [n] int32 dense ids.

    Args:
      history: original item ids (str; ints are compared as their str).
      on_unknown: "error" raises UnknownIdError naming them; "drop" drops them (count logged).
      what: how to name this history in messages.

    Returns:
      The dense ids, in order.

    Raises:
      UnknownIdError: unknown ids with on_unknown="error".
      ValueError: an empty history (before or after dropping).
    """
    return dense_item_ids(history, self._item_index, on_unknown, what, self.workdir)

  def user_index(self, users: Sequence[Any]) -> np.ndarray:
    """Original user ids -> [n] int64 user indices (order kept); unknown ids raise, naming them."""
    return dense_user_ids(users, self._user_index, self.workdir)

  # -------------------------------------------------------------------------------------------
  # Device steps.

  def _step(self, kind: str, **static) -> Callable:
    """The jitted, mesh-sharded step of `kind` ("topk", "vectors", "scores"), cached."""
    key = (kind, tuple(sorted(static.items())))
    if key not in self._steps:
      fields = {"inputs": 2}
      if kind == "topk":
        fn = functools.partial(topk_step, model=self.model, **static)
        if static["exclude_seen"]:
          fields["history"] = 2
        out = (self.partitioner.replicated, self.partitioner.replicated)
      elif kind == "vectors":
        fn = functools.partial(vectors_step, model=self.model)
        out = self.partitioner.replicated
      else:
        fn = functools.partial(scores_step, model=self.model)
        out = self.partitioner.replicated
      # Results are replicated: [G, K] (or [G, D]) is small, and every process then reads the
      # rows it needs without knowing which devices hold which batch rows.
      self._steps[key] = self.partitioner.partition_step(
          fn, in_shardings=(self.param_shardings,
                            {f: self.partitioner.batch_sharding(n) for f, n in fields.items()}),
          out_shardings=out)
    return self._steps[key]

  def _run(self, items: np.ndarray, starts: np.ndarray, ends: np.ndarray, kind: str,
           global_batch: int, **static) -> Iterator[Tuple[int, int, Any]]:
    """Runs a step over sequences `items[starts[i]:ends[i]]`, one global batch at a time.

    Batches come from `process_batches`; batch b+1 is dispatched before batch b is fetched by
    the caller, so host work (JSON) overlaps device work.

    Yields:
      (first global row, number of real rows, device result of the step), in order.
    """
    step = self._step(kind, **static)
    exclude = bool(static.get("exclude_seen", False))
    for lo, real, windows, history in process_batches(items, starts, ends, global_batch,
                                                      self.max_len, exclude):
      batch = {"inputs": windows}  # [G/P, L]
      if history is not None:
        batch["history"] = history  # [G/P, H]
      yield lo, real, step(self.params, self.partitioner.shard_inputs(batch))

  def _batch_size_for(self, n: int) -> int:
    """Global batch for n rows: a power-of-two bucket (few shapes) up to `batch_size`."""
    return min(self.batch_size, -(-shape_bucket(n, 1) // self._row_multiple) * self._row_multiple)

  def _csr(self, sequences: Sequence[np.ndarray]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = np.asarray([len(s) for s in sequences], dtype=np.int64)
    ends = np.cumsum(lengths)
    items = np.concatenate(sequences).astype(np.int32) if len(sequences) else np.zeros(0, np.int32)
    return items, ends - lengths, ends

  def topk_dense(self, sequences: Sequence[np.ndarray], k: int,
                 exclude_seen: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Top-K dense ids and scores of dense-id sequences.

    Args:
      sequences: n non-empty int arrays of dense item ids, oldest first.
      k: K (clipped to n_items).
      exclude_seen: remove every item of a sequence from its ranking.

    Returns:
      (ids [n, K] int32, scores [n, K] float32); scores of -inf mark no candidate.
    """
    k = self._check_k(k)
    items, starts, ends = self._csr(sequences)
    n = len(starts)
    ids = np.zeros((n, k), np.int32)
    scores = np.full((n, k), -np.inf, np.float32)
    for lo, real, (top_ids, top_scores) in prefetched(
        self._run(items, starts, ends, "topk", self._batch_size_for(n), k=k,
                  exclude_seen=bool(exclude_seen))):
      ids[lo:lo + real] = fetch(top_ids)[:real]
      scores[lo:lo + real] = fetch(top_scores)[:real]
    return ids, scores

  def vectors_dense(self, sequences: Sequence[np.ndarray]) -> np.ndarray:
    """[n, D] float32 user vectors of dense-id sequences (the last max_len items of each)."""
    items, starts, ends = self._csr(sequences)
    return self._vectors(items, starts, ends)

  def _vectors(self, items, starts, ends, out: Optional[np.ndarray] = None) -> np.ndarray:
    n = len(starts)
    if out is None:
      out = np.zeros((n, self.dim), np.float32)
    for lo, real, vecs in prefetched(
        self._run(items, starts, ends, "vectors", self._batch_size_for(n))):
      out[lo:lo + real] = fetch(vecs)[:real]
    return out

  @property
  def dim(self) -> int:
    """Width D of user vectors and item embeddings."""
    return int(self.item_table().shape[1])

  def item_table(self) -> np.ndarray:
    """The model's full [table_rows, D] float32 output item table (row = dense id)."""
    if not hasattr(self, "_table"):
      # Replicated out of jit: the table may be sharded over devices of several processes.
      gather = jax.jit(lambda p: self.model.apply({"params": p}, method=_item_table),
                       in_shardings=(self.param_shardings,),
                       out_shardings=self.partitioner.replicated)
      with self.partitioner.context():
        self._table = fetch(gather(self.params)).astype(np.float32)
    return self._table

  def item_embeddings(self) -> np.ndarray:
    """[n_items, D] float32: row r is item `item_ids[r + 1]` (dense id r + 1)."""
    return self.item_table()[1:self.n_items + 1]

  def _check_k(self, k: int) -> int:
    if int(k) < 1:
      raise ValueError(f"k must be >= 1, got {k}")
    return min(int(k), self.n_items)

  # -------------------------------------------------------------------------------------------
  # Python API.

  def recommend(self, history: Union[Sequence[Any], Sequence[Sequence[Any]]], k: int = 10,
                exclude_seen: bool = True, on_unknown: str = "error"
                ) -> Union[Recommendation, List[Recommendation]]:
    """Top-K items for one history or a batch of histories, new users included.

    No retraining: the encoder reads the history like any training user's sequence.  In a
    multi-process job this is a collective: every process calls it with the same arguments.

    Args:
      history: one history (a list of original item ids, oldest first) or a batch (a list of
        such lists).
      k: number of items (at most the catalogue size).
      exclude_seen: leave the history's items out of the recommendations.
      on_unknown: "error" (raise UnknownIdError naming the unknown ids) or "drop" (ignore them,
        logging the count).

    Returns:
      A Recommendation for one history, a list of them for a batch.

    Raises:
      UnknownIdError: unknown item ids with on_unknown="error".
      ValueError: an empty history (also after dropping unknown ids).
    """
    single, batch = split_histories(history)
    dense = [self.item_index(h, on_unknown, what=("history" if single else f"history {i}"))
             for i, h in enumerate(batch)]
    ids, scores = self.topk_dense(dense, k, exclude_seen)
    out = [self._recommendation(i, s) for i, s in zip(ids, scores)]
    return out[0] if single else out

  def recommend_users(self, users: Sequence[Any], k: int = 10,
                      exclude_seen: bool = True) -> List[Recommendation]:
    """Top-K items for known users (original user ids), from their whole sequences."""
    idx = self.user_index(users)
    offsets = self.dataset.offsets
    ids, scores = self.topk_dense([self.dataset.items[offsets[u]:offsets[u + 1]] for u in idx],
                                  k, exclude_seen)
    return [self._recommendation(i, s) for i, s in zip(ids, scores)]

  def user_vectors(self, histories: Sequence[Sequence[Any]],
                   on_unknown: str = "error") -> np.ndarray:
    """[n, D] float32 vectors of histories of original item ids (dot them with item_embeddings)."""
    return self.vectors_dense([self.item_index(h, on_unknown, what=f"history {i}")
                               for i, h in enumerate(histories)])

  def _recommendation(self, ids: np.ndarray, scores: np.ndarray) -> Recommendation:
    keep = np.isfinite(scores)
    return Recommendation(items=[str(x) for x in self.item_ids[ids[keep]]],
                          scores=scores[keep].astype(np.float64).tolist())

  # -------------------------------------------------------------------------------------------
  # Batch top-K to JSONL.

  def write_topk(self, out: str, k: int = 100, *, users: Optional[Sequence[Any]] = None,
                 exclude_seen: bool = False, overwrite: bool = False, progress: bool = True,
                 decimals: Optional[int] = 6) -> Dict[str, Any]:
    """Streams `{"user", "items", "scores"}` JSONL rows, one per user, best item first.

    Args:
      out: the output file; in a multi-process run each process writes `shard_path(out, p, P)`.
      k: items per user (clipped to the catalogue size).
      users: original user ids in the wanted order; default every user of the dataset.
      exclude_seen: leave each user's whole history out of its items.
      overwrite: redo a complete file, or one written with other settings.
      progress: tqdm bar (users/s) on process 0.
      decimals: scores are rounded to this many decimals in the file (None: the exact float32
        value); the ranking always uses the unrounded scores.

    Returns:
      {"path", "rows", "skipped", "seconds", "users_per_second"}.

    Raises:
      UnknownIdError: a user id not in the dataset.
      FileExistsError: a complete file from other settings exists and overwrite is False.
    """
    k = self._check_k(k)
    user_idx = select_users(self.dataset, users, self.user_index)
    procs, me = jax.process_count(), jax.process_index()
    path = shard_path(out, me, procs)
    g = self._batch_size_for(len(user_idx))
    settings = output_settings(self.workdir, self.best_step, k, exclude_seen, decimals,
                               self.user_ids[user_idx], g)
    done = complete_output(path, settings, overwrite)
    if done is not None:
      return done
    offsets = self.dataset.offsets
    starts, ends = offsets[user_idx], offsets[user_idx + 1]
    local = g // procs
    n_local = local_row_count(len(user_idx), g)
    bar = progress_bar(n_local, enabled=progress and me == 0)
    users_out = self.user_ids[user_idx]
    with RowsWriter(path, settings, self.item_ids, self._item_json, decimals) as writer:
      for lo, real, (top_ids, top_scores) in prefetched(
          self._run(self.dataset.items, starts, ends, "topk", g, k=k,
                    exclude_seen=bool(exclude_seen))):
        first, last = me * local, min(real, (me + 1) * local)  # this process's real rows
        if last <= first:
          continue
        ids = fetch(top_ids)[first:last]  # [b, K]
        scores = fetch(top_scores)[first:last]  # [b, K]
        writer.write_block(users_out[lo + first:lo + last], ids, scores)
        bar.update(last - first)
    bar.close()
    stats = writer.stats()
    logging.info("wrote top-%d of %d users to %s in %.1f s (%.0f users/s)", k, stats["rows"],
                 path, stats["seconds"], stats["users_per_second"])
    return stats

  # -------------------------------------------------------------------------------------------
  # Export.

  def check_dot_product(self, sample: int = 64, seed: int = 0) -> float:
    """Verifies that the model's scores are dot products of user vectors with the item table.

    Args:
      sample: users checked (random, from the dataset).
      seed: sampling seed.

    Returns:
      The largest absolute difference found.

    Raises:
      ValueError: the scores differ from the dot products beyond float rounding (a model whose
        score has a bias, a non-linearity or another table), so an index over the item table
        would not reproduce its ranking.
    """
    rng = np.random.default_rng(seed)
    users = rng.choice(self.dataset.n_users, min(sample, self.dataset.n_users), replace=False)
    offsets = self.dataset.offsets
    seqs = [self.dataset.items[offsets[u]:offsets[u + 1]] for u in users]
    items, starts, ends = self._csr(seqs)
    vecs = self._vectors(items, starts, ends)  # [S, D]
    model_scores = np.concatenate([
        fetch(s)[:real] for _, real, s in prefetched(
            self._run(items, starts, ends, "scores", self._batch_size_for(len(seqs))))])
    real = slice(1, self.n_items + 1)
    dots = vecs.astype(np.float64) @ self.item_table()[real].astype(np.float64).T  # [S, n]
    diff = float(np.max(np.abs(model_scores[:, real] - dots)))
    scale = float(np.max(np.abs(dots))) + 1.0
    low_precision = np.dtype(getattr(self.model.config, "dtype", "float32")) != np.float32
    tol = (2e-2 if low_precision else 1e-4) * scale
    if not diff <= tol:
      raise ValueError(
          f"{type(self.model).__name__}.score is not a dot product with its item table: max "
          f"|score - user . item| = {diff:.3g} > {tol:.3g}; an exported index would not reproduce "
          "the model's ranking")
    logging.info("score = user vector . item embedding verified on %d users (max diff %.2g)",
                 len(seqs), diff)
    return diff

  def export(self, out_dir: str, *, k: int = 100, recall_sample: int = 1000,
             tree_min_items: int = 10_000, num_leaves: int = 0, leaves_to_search: int = 0,
             reorder: int = 0, min_recall: float = 0.95, overwrite: bool = False,
             seed: int = 0) -> Dict[str, Any]:
    """Writes item embeddings, user vectors, id maps and a ScaNN index over the items.

    Layout of `out_dir` (built in `<out_dir>.tmp` and renamed when complete):
      item_embeddings.npy  [n_items, D] float32, row r = item_ids.json[r] (dense id r + 1)
      item_ids.json        original item ids in row order
      user_vectors.npy     [n_users, D] float32, each user's whole sequence encoded
      user_ids.json        original user ids in row order
      scann/               ScaNN searcher (`scann.scann_ops_pybind.load_searcher`); it returns
                           rows of item_embeddings.npy, scored by dot product
      export.json          settings, index parameters, the dot-product check and the recall of
                           the index against exact search on a sample of the user vectors

    Args:
      out_dir: the export folder.
      k: neighbours the index is tuned for and recall@k is measured at.
      recall_sample: user vectors whose ScaNN top-k is compared with exact search.
      tree_min_items: below this many items the index is exact brute force (a tree over a small
        catalogue must search most leaves anyway); from it on, a k-means tree with asymmetric
        hashing and exact reordering.
      num_leaves: tree leaves; 0 = round(sqrt(n_items)).
      leaves_to_search: leaves searched per query; 0 = enough leaves for >= 20% of them and
        about 30 k candidate items.
      reorder: candidates re-scored exactly; 0 = 10 k.
      min_recall: a recall below this is logged as a warning (and flagged in export.json).
      overwrite: rebuild a complete export with the same settings too.
      seed: sampling seed for the checks.

    Returns:
      The contents of export.json.
    """
    k = self._check_k(k)
    out_dir = os.path.abspath(out_dir)
    is_main = jax.process_index() == 0
    settings = {"format_version": FORMAT_VERSION, "workdir": self.workdir,
                "best_step": self.best_step, "k": k, "recall_sample": recall_sample,
                "tree_min_items": tree_min_items, "num_leaves": num_leaves,
                "leaves_to_search": leaves_to_search, "reorder": reorder, "seed": seed}
    manifest_path = os.path.join(out_dir, EXPORT_MANIFEST)
    previous = read_json(manifest_path)
    if previous is not None and previous.get("settings") == settings and not overwrite:
      logging.info("%s is complete; skipping (overwrite=True rebuilds it)", out_dir)
      return previous
    if os.path.exists(out_dir) and previous is None and os.listdir(out_dir):
      # Never delete a folder this function did not write (e.g. --out pointing at the workdir).
      raise FileExistsError(f"{out_dir} exists and is not an export folder (no {EXPORT_MANIFEST}); "
                            "choose another --out or remove it")
    max_diff = self.check_dot_product(seed=seed)
    t0 = time.perf_counter()
    offsets = self.dataset.offsets
    # Every process computes (the steps are collective); process 0 writes.
    tmp = out_dir + ".tmp"
    if is_main:
      shutil.rmtree(tmp, ignore_errors=True)  # a killed export's leftovers
      os.makedirs(tmp)
      user_vecs = np.lib.format.open_memmap(os.path.join(tmp, "user_vectors.npy"), mode="w+",
                                            dtype=np.float32,
                                            shape=(self.dataset.n_users, self.dim))
    else:
      user_vecs = np.zeros((self.dataset.n_users, self.dim), np.float32)
    self._vectors(self.dataset.items, offsets[:-1], offsets[1:], out=user_vecs)
    vectors_s = time.perf_counter() - t0
    items = np.ascontiguousarray(self.item_embeddings())
    params = _index_params(self.n_items, k, tree_min_items, num_leaves, leaves_to_search, reorder)
    t1 = time.perf_counter()
    searcher = build_scann(items, k, params)
    build_s = time.perf_counter() - t1
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(self.dataset.n_users, min(recall_sample, self.dataset.n_users),
                                replace=False))
    queries = np.ascontiguousarray(user_vecs[sample])
    recall, search_s = scann_recall(searcher, items, queries, k)
    if recall < min_recall:
      logging.warning("ScaNN recall@%d = %.4f < %.2f on %d users: raise leaves_to_search or "
                      "reorder", k, recall, min_recall, len(sample))
    logging.info("ScaNN (%s) recall@%d = %.4f against exact search on %d users", params["type"],
                 k, recall, len(sample))
    manifest = {
        "settings": settings, "model": self.config.model.name, "n_items": self.n_items,
        "n_users": int(self.dataset.n_users), "dim": self.dim, "score": "dot_product",
        "dot_product_check_max_abs_diff": max_diff, "index": params,
        "recall": {f"recall@{k}": recall, "k": k, "sample_users": int(len(sample)),
                   "min_recall": min_recall, "ok": bool(recall >= min_recall),
                   "search_seconds": search_s},
        "seconds": {"user_vectors": vectors_s, "index_build": build_s},
        "files": {"item_embeddings": "item_embeddings.npy", "item_ids": "item_ids.json",
                  "user_vectors": "user_vectors.npy", "user_ids": "user_ids.json",
                  "scann": "scann"},
    }
    if is_main:
      user_vecs.flush()
      del user_vecs
      np.save(os.path.join(tmp, "item_embeddings.npy"), items)
      with open(os.path.join(tmp, "item_ids.json"), "w", encoding="utf-8") as f:
        json.dump([str(x) for x in self.item_ids[1:]], f)
      with open(os.path.join(tmp, "user_ids.json"), "w", encoding="utf-8") as f:
        json.dump([str(x) for x in self.user_ids], f)
      os.makedirs(os.path.join(tmp, "scann"))
      searcher.serialize(os.path.join(tmp, "scann"), relative_path=True)  # survives the rename
      with open(os.path.join(tmp, EXPORT_MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
      if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
      os.replace(tmp, out_dir)
      logging.info("exported %d item and %d user vectors (D=%d) and a ScaNN index to %s",
                   self.n_items, self.dataset.n_users, self.dim, out_dir)
    return manifest


def _is_sequence(x: Any) -> bool:
  return isinstance(x, (list, tuple, np.ndarray))


def prefetched(gen: Iterator[Tuple[int, int, Any]]) -> Iterator[Tuple[int, int, Any]]:
  """Yields each item of `gen` only after the next one was produced (dispatched)."""
  previous = None
  for item in gen:
    if previous is not None:
      yield previous
    previous = item
  if previous is not None:
    yield previous


def read_json(path: str) -> Optional[Dict[str, Any]]:
  """A JSON file's content; None when it is missing or unreadable (e.g. cut short)."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


class _NoBar:
  def update(self, n):
    pass

  def close(self):
    pass


def progress_bar(total: int, enabled: bool, desc: str = "recommend"):
  """A tqdm bar over `total` users, or a no-op stand-in when disabled."""
  if not enabled:
    return _NoBar()
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=desc, unit="user", dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------
# Top-K JSONL files: shared by every recommender (item-id encoders here, CALRec in calrec_jax).


def local_row_count(n: int, global_batch: int) -> int:
  """Rows this process writes of n rows cut in global batches (process p: rows [p G/P, (p+1) G/P)
  of each batch, the last batch's padding excluded)."""
  procs, me = jax.process_count(), jax.process_index()
  local = global_batch // procs
  return sum(max(0, min(n - lo - me * local, local)) for lo in range(0, n, global_batch))


def format_rows(user_json: Sequence[str], item_json: np.ndarray, ids: np.ndarray,
                scores: np.ndarray, decimals: Optional[int]) -> str:
  """JSONL text of a block of `{"user", "items", "scores"}` rows, best item first.

  Args:
    user_json: b JSON-encoded user ids.
    item_json: JSON-encoded original item ids by dense id (an object array).
    ids: [b, K] dense item ids.
    scores: [b, K] scores; entries that are not finite (-inf: no candidate) are left out, so a
      row may hold fewer than K items.
    decimals: scores are rounded to this many decimals (None: the exact value).

  Returns:
    b lines, each ending with a newline.
  """
  values = scores.astype(np.float64)
  if decimals is not None:
    values = np.round(values, decimals)
  lines = []
  for u, row_ids, row_scores, row_values in zip(user_json, ids, scores, values):
    keep = np.isfinite(row_scores)
    if not keep.all():
      row_ids, row_values = row_ids[keep], row_values[keep]
    lines.append('{"user": %s, "items": [%s], "scores": [%s]}\n' % (
        u, ", ".join(item_json[row_ids]), ", ".join(map(repr, row_values.tolist()))))
  return "".join(lines)


def complete_output(path: str, settings: Dict[str, Any],
                    overwrite: bool) -> Optional[Dict[str, Any]]:
  """Whether `path` is already done: a complete file written with the same settings.

  Args:
    path: the output file of this process.
    settings: everything the file's content depends on (compared with `<path>.meta.json`).
    overwrite: redo the file whatever it holds.

  Returns:
    The stats to return for a complete file with the same settings (skipped), or None when the
    file must be (re)written: it is missing (a killed run's `.tmp` does not count), or overwrite.

  Raises:
    FileExistsError: a complete file from other settings exists and overwrite is False.
  """
  if not os.path.exists(path) or overwrite:
    return None
  meta_path = path + ".meta.json"
  previous = read_json(meta_path)
  if previous is not None and previous.get("settings") == settings:
    logging.info("%s is complete (%d rows); skipping (overwrite=True redoes it)", path,
                 previous["rows"])
    return {"path": path, "rows": previous["rows"], "skipped": True, "seconds": 0.0,
            "users_per_second": float("nan")}
  raise FileExistsError(
      f"{path} exists but was written with other settings ({meta_path}: "
      f"{previous and previous.get('settings')} vs now {settings}); pass overwrite=True "
      "(--overwrite) to replace it")


PARQUET_SUFFIX = ".parquet"


def _parquet_modules():
  try:
    import pyarrow  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ImportError("writing a .parquet top-K file needs pyarrow: pip install pyarrow "
                      "(or pip install seqrec-jax[parquet]); a .jsonl name needs nothing") from e
  return pyarrow, pyarrow.parquet


def parquet_table(users: Sequence[str], item_ids: np.ndarray, ids: np.ndarray,
                  scores: np.ndarray, decimals: Optional[int]):
  """A pyarrow table of `{"user", "items", "scores"}` rows, the same rows as `format_rows`.

  Columns: user (string), items (list<string>: original ids, best first), scores (list<double>,
  rounded to `decimals` unless None).  Non-finite scores (no candidate) are left out.
  """
  pa, _ = _parquet_modules()
  keep = np.isfinite(scores)                                                      # [b, K]
  offsets = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int32)   # [b + 1]
  values = scores[keep].astype(np.float64)                                        # row-major
  if decimals is not None:
    values = np.round(values, decimals)
  names = np.asarray(item_ids, dtype=object)[ids[keep]]
  return pa.table({
      "user": pa.array([str(u) for u in users], pa.string()),
      "items": pa.ListArray.from_arrays(pa.array(offsets),
                                        pa.array([str(x) for x in names], pa.string())),
      "scores": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float64())),
  })


class RowsWriter:
  """Writes a top-K file (JSONL, or Parquet for a `.parquet` path) so that a file under its final
  name is always complete.

  Rows go to `<path>.tmp` (a fixed name: a killed run's leftover is overwritten, never read).
  On a clean exit of the `with` block the file is synced, `<path>.meta.json` records the settings
  and the row count, and only then is the `.tmp` renamed: a file under `path` always has its
  settings, which is what lets `complete_output` skip it on a rerun.  An exception leaves the
  `.tmp` alone and `path` untouched.  Parquet files get one row group per block (host memory
  stays O(block x K)).

    with RowsWriter(path, settings, item_ids, item_json, decimals) as writer:
      writer.write_block(user_ids, ids, scores)   # raw user ids [b], dense ids / scores [b, K]
    stats = writer.stats()
  """

  def __init__(self, path: str, settings: Dict[str, Any], item_ids: np.ndarray,
               item_json: Optional[np.ndarray] = None, decimals: Optional[int] = 6):
    self.path = path
    self.settings = settings
    self.parquet = path.endswith(PARQUET_SUFFIX)
    self.item_ids = item_ids
    self.item_json = (item_json if item_json is not None else
                      np.asarray([json.dumps(str(x)) for x in item_ids], dtype=object))
    self.decimals = decimals
    self.rows = 0
    self.seconds = 0.0
    self._file = None
    self._t0 = 0.0

  def __enter__(self) -> "RowsWriter":
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    self._t0 = time.perf_counter()
    if self.parquet:
      pa, pq = _parquet_modules()
      schema = pa.schema([("user", pa.string()), ("items", pa.list_(pa.string())),
                          ("scores", pa.list_(pa.float64()))])
      self._file = pq.ParquetWriter(self.path + ".tmp", schema)
    else:
      # Closed in __exit__: the file outlives this method by design.
      self._file = open(self.path + ".tmp", "w", encoding="utf-8")  # pylint: disable=R1732
    return self

  def write_block(self, users: Sequence[str], ids: np.ndarray, scores: np.ndarray) -> None:
    """Appends the rows of `users` (original ids), their [b, K] dense item ids and scores."""
    if self.parquet:
      self._file.write_table(parquet_table(users, self.item_ids, ids, scores, self.decimals))
    else:
      user_json = [json.dumps(str(u)) for u in users]
      self._file.write(format_rows(user_json, self.item_json, ids, scores, self.decimals))
    self.rows += len(users)

  def __exit__(self, exc_type, exc, tb) -> bool:
    f, self._file = self._file, None
    if exc_type is not None:
      f.close()
      return False  # re-raise; no meta, no rename
    if self.parquet:
      f.close()
      with open(self.path + ".tmp", "rb+") as g:
        os.fsync(g.fileno())
    else:
      f.flush()
      os.fsync(f.fileno())
      f.close()
    self.seconds = time.perf_counter() - self._t0
    fileio.atomic_write(self.path + ".meta.json",
                        lambda m: json.dump({"settings": self.settings, "rows": self.rows}, m,
                                            indent=2), mode="w")
    os.replace(self.path + ".tmp", self.path)
    return False

  def stats(self) -> Dict[str, Any]:
    """{"path", "rows", "skipped": False, "seconds", "users_per_second"} of the written file."""
    speed = self.rows / self.seconds if self.seconds > 0 else float("nan")
    return {"path": self.path, "rows": self.rows, "skipped": False, "seconds": self.seconds,
            "users_per_second": speed}


# ---------------------------------------------------------------------------------------------
# ScaNN.


def _index_params(n: int, k: int, tree_min_items: int, num_leaves: int, leaves_to_search: int,
                  reorder: int) -> Dict[str, Any]:
  """The index type and parameters for n items (see `Recommender.export`)."""
  if n < tree_min_items:
    return {"type": "brute_force", "n": n}
  leaves = int(num_leaves) or max(2, int(round(math.sqrt(n))))
  leaves = max(1, min(leaves, n))
  # Maximum inner product search over an L2 k-means partition: the best items of a query spread
  # over several leaves, so search a generous share (>= 20%, and about 30 k candidates).
  search = int(leaves_to_search) or max(math.ceil(0.2 * leaves),
                                        math.ceil(leaves * min(1.0, 30.0 * k / n)))
  return {"type": "tree_ah", "n": n, "num_leaves": leaves,
          "num_leaves_to_search": max(1, min(search, leaves)),
          "reorder": max(int(reorder) or 10 * k, k), "dims_per_block": 2,
          "anisotropic_quantization_threshold": 0.2,
          "training_sample_size": min(n, 100_000),
          # k-means++ centres: a rebuild gives the same index (ScaNN's random init does not).
          "tree_init": ann.DEFAULT_TREE_INIT}


def build_scann(items: np.ndarray, k: int, params: Dict[str, Any]):
  """Builds a dot-product ScaNN searcher over `items` [n, D] as `params` (from _index_params)."""
  if params["type"] == "brute_force":
    scann = ann.import_scann()
    return (scann.scann_ops_pybind.builder(np.ascontiguousarray(items, np.float32), k,
                                           "dot_product").score_brute_force().build())
  return ann.tree_ah_searcher(
      items, k, num_leaves=params["num_leaves"],
      num_leaves_to_search=params["num_leaves_to_search"],
      training_sample_size=params["training_sample_size"], reorder=params["reorder"],
      # params written before "tree_init" existed were built with random init
      init=params.get("tree_init", "random"), dims_per_block=params["dims_per_block"],
      anisotropic_quantization_threshold=params["anisotropic_quantization_threshold"])


def exact_topk(queries: np.ndarray, items: np.ndarray, k: int,
               block_bytes: int = 1 << 28) -> np.ndarray:
  """[Q, k] exact top-k rows by dot product (ties: lower row first), O(block x n) memory."""
  n = items.shape[0]
  rows = max(1, block_bytes // (16 * n))
  out = np.empty((queries.shape[0], k), np.int64)
  for lo in range(0, queries.shape[0], rows):
    out[lo:lo + rows] = ann.topk_rows(queries[lo:lo + rows] @ items.T, k)[0]
  return out


def scann_recall(searcher, items: np.ndarray, queries: np.ndarray, k: int) -> Tuple[float, float]:
  """Mean recall@k of `searcher` against exact search, and the search seconds.

  Rows ScaNN could not fill (NaN distances, index padding) count as misses.
  """
  t = time.perf_counter()
  idx, dist = searcher.search_batched(queries, final_num_neighbors=k)
  seconds = time.perf_counter() - t
  idx = np.asarray(idx, np.int64)
  idx = np.where(np.isnan(np.asarray(dist)), -1, idx)
  exact = exact_topk(queries, items, k)
  found = (idx[:, :, None] == exact[:, None, :]).any(axis=1)  # [Q, k] exact item found
  return float(found.mean()), seconds


def load_export(out_dir: str):
  """(ScaNN searcher, item ids by row, export.json) of an export folder, for serving."""
  scann = ann.import_scann()
  with open(os.path.join(out_dir, EXPORT_MANIFEST), encoding="utf-8") as f:
    manifest = json.load(f)
  with open(os.path.join(out_dir, "item_ids.json"), encoding="utf-8") as f:
    item_ids = json.load(f)
  return scann.scann_ops_pybind.load_searcher(os.path.join(out_dir, "scann")), item_ids, manifest
