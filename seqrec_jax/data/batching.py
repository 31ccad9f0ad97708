"""Host-side batching: fixed-length, left-padded windows gathered from the CSR item array.

Every batch is built by one vectorised gather (``gather_windows``); nothing materialises
per-prefix copies.  Batches are *global* (the same on every process, decided by a permutation
seeded from ``(seed, epoch)``) and each process yields only its own contiguous slice of rows, so
a multi-host run sees exactly the batches a single-host run would.
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, Mapping, Optional, Tuple

import jax
import numpy as np

from seqrec_jax.data.dataset import PAD_ID
from seqrec_jax.data.split import LeaveOneOutSplit

EVAL_STAGES = ("valid", "test")


def gather_windows(items: np.ndarray, ends: np.ndarray, starts: np.ndarray,
                   max_len: int) -> np.ndarray:
  """Left-padded windows ``items[max(start, end - max_len):end]``.

  Args:
    items: [N] item array (CSR values).
    ends: [B] exclusive end index of each window.
    starts: [B] first index each window may reach (the user's offset).
    max_len: window length L.

  Returns:
    [B, L] int32, each row right-aligned and left-padded with ``PAD_ID``.
  """
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}")
  ends = np.asarray(ends, dtype=np.int64)
  starts = np.asarray(starts, dtype=np.int64)
  idx = ends[:, None] - max_len + np.arange(max_len, dtype=np.int64)  # [B, L]
  valid = idx >= starts[:, None]                                      # [B, L]
  out = np.asarray(items)[np.where(valid, idx, 0)]                    # [B, L]
  return np.where(valid, out, PAD_ID).astype(np.int32)


def _resolve_processes(global_batch_size: int, process_index: Optional[int],
                       process_count: Optional[int]) -> Tuple[int, int, int]:
  """Returns (process_index, process_count, local_batch_size)."""
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if global_batch_size < 1:
    raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"bad process_index {process_index} for process_count {process_count}")
  if global_batch_size % process_count != 0:
    raise ValueError(
        f"global_batch_size {global_batch_size} is not divisible by process_count "
        f"{process_count}")
  return process_index, process_count, global_batch_size // process_count


def _pad_rows(rows: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray]:
  """Pads a non-empty index array to ``size`` by repeating ``rows[0]``; returns (rows, weights)."""
  n = len(rows)
  weights = np.zeros(size, dtype=np.float32)
  weights[:n] = 1.0
  if n < size:
    rows = np.concatenate([rows, np.full(size - n, rows[0], dtype=rows.dtype)])
  return rows, weights


class TrainIterator:
  """Endless iterator over shuffled training batches, resumable from ``get_state()``.

  Epoch ``e`` visits the training examples in the order
  ``np.random.default_rng([seed, e]).permutation(n_train)``; global step ``s`` of the epoch takes
  ``perm[s * G:(s + 1) * G]``, the last step padded to ``G`` rows with weight 0.  Process ``p``
  yields rows ``[p * G / P, (p + 1) * G / P)`` of every global batch.

  Each batch is a dict of numpy arrays (b = G / P local rows, L = max_len):
    inputs: [b, L] int32, ``items[t - L:t]`` within the user, left-padded.
    targets: [b] int32, ``items[t]``.
    target_seq: [b, L] int32, the next item at each input position (``items[t - L + 1:t + 1]``),
      0 where the input is padding.
    users: [b] int32.
    weights: [b] float32, 1 for real rows, 0 for padding.
  """

  def __init__(self, split: LeaveOneOutSplit, max_len: int, global_batch_size: int, seed: int,
               process_index: Optional[int] = None, process_count: Optional[int] = None):
    """Creates the iterator positioned at epoch 0, step 0.

    Args:
      split: the leave-one-out split.
      max_len: input window length L.
      global_batch_size: rows per global step G (over all processes).
      seed: shuffling seed (non-negative int).
      process_index: this process; default ``jax.process_index()``.
      process_count: number of processes P; default ``jax.process_count()``.
    """
    if max_len < 1:
      raise ValueError(f"max_len must be >= 1, got {max_len}")
    self._split = split
    self._items = split.dataset.items
    self._user_start = split.dataset.offsets[:-1]
    self._max_len = int(max_len)
    self._global_batch_size = int(global_batch_size)
    self._seed = int(seed)
    self._process_index, self._process_count, self._local_batch_size = _resolve_processes(
        self._global_batch_size, process_index, process_count)
    self._n_train = split.n_train
    if self._n_train == 0:
      raise ValueError("the split has no training examples")
    self._steps_per_epoch = math.ceil(self._n_train / self._global_batch_size)
    self._epoch = 0
    self._step = 0
    self._perm_epoch = -1
    self._perm = None

  @property
  def steps_per_epoch(self) -> int:
    return self._steps_per_epoch

  @property
  def epoch(self) -> int:
    """The epoch of the next batch."""
    return self._epoch

  @property
  def step_in_epoch(self) -> int:
    """The step within the epoch of the next batch."""
    return self._step

  @property
  def local_batch_size(self) -> int:
    return self._local_batch_size

  def get_state(self) -> Dict[str, int]:
    """JSON-serialisable position of the next batch: ``{"epoch", "step_in_epoch"}``."""
    return {"epoch": int(self._epoch), "step_in_epoch": int(self._step)}

  def set_state(self, state: Mapping[str, int]) -> None:
    """Restores a position from ``get_state()``; the next batch is then bitwise identical.

    Args:
      state: ``{"epoch": int, "step_in_epoch": int}``.
    """
    epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
    if epoch < 0 or not 0 <= step <= self._steps_per_epoch:
      raise ValueError(
          f"bad iterator state {dict(state)} (steps_per_epoch={self._steps_per_epoch})")
    if step == self._steps_per_epoch:
      epoch, step = epoch + 1, 0
    self._epoch, self._step = epoch, step

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._perm_epoch != epoch:
      self._perm = np.random.default_rng([self._seed, epoch]).permutation(self._n_train)
      self._perm_epoch = epoch
    return self._perm

  def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    perm = self._permutation(self._epoch)
    g = self._global_batch_size
    rows, weights = _pad_rows(perm[self._step * g:(self._step + 1) * g], g)   # [G], [G]
    lo = self._process_index * self._local_batch_size
    hi = lo + self._local_batch_size
    rows, weights = rows[lo:hi], weights[lo:hi]                               # [b], [b]
    batch = self._make_batch(rows)
    batch["weights"] = weights
    self._step += 1
    if self._step == self._steps_per_epoch:
      self._epoch, self._step = self._epoch + 1, 0
    return batch

  def _make_batch(self, rows: np.ndarray) -> Dict[str, np.ndarray]:
    t = self._split.train_targets[rows]                          # [b] absolute target index
    users = self._split.train_users[rows]                        # [b]
    starts = self._user_start[users]                             # [b]
    return {
        "inputs": gather_windows(self._items, t, starts, self._max_len),           # [b, L]
        "targets": self._items[t].astype(np.int32),                                # [b]
        "target_seq": gather_windows(self._items, t + 1, starts + 1, self._max_len),  # [b, L]
        "users": users.astype(np.int32),                                           # [b]
        "examples": rows.astype(np.int32),  # [b] index into split.train_targets (SRA-CL keys)
    }


def num_eval_batches(split: LeaveOneOutSplit, global_batch_size: int) -> int:
  """Number of global batches ``eval_batches`` yields (all evaluated users, last one padded)."""
  if global_batch_size < 1:
    raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
  return math.ceil(split.n_eval / global_batch_size)


def eval_batches(split: LeaveOneOutSplit, stage: str, max_len: int, global_batch_size: int,
                 process_index: Optional[int] = None, process_count: Optional[int] = None,
                 history_len: int = 0) -> Iterator[Dict[str, np.ndarray]]:
  """Batches over all ``split.eval_users`` in order, for one evaluation stage.

  ``"valid"``: the input is everything before the second-to-last item, the target is the
  second-to-last item.  ``"test"``: the input is everything before the last item (so it contains
  the validation item), the target is the last item.  The user list is padded to whole global
  batches with weight-0 rows; process ``p`` gets rows ``[p * G / P, (p + 1) * G / P)``.

  Args:
    split: the leave-one-out split.
    stage: "valid" or "test".
    max_len: input window length L.
    global_batch_size: rows per global batch G.
    process_index: this process; default ``jax.process_index()``.
    process_count: number of processes P; default ``jax.process_count()``.
    history_len: if > 0, also yield ``history`` [b, history_len], the same input window but
      ``history_len`` long (e.g. to exclude already-seen items).

  Returns:
    A generator of dicts with ``inputs`` [b, L] int32, ``targets`` [b] int32, ``users`` [b]
    int32, ``weights`` [b] float32 and optionally ``history`` [b, H] int32.
  """
  if stage not in EVAL_STAGES:
    raise ValueError(f"stage must be one of {EVAL_STAGES}, got {stage!r}")
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}")
  process_index, _, local = _resolve_processes(global_batch_size, process_index, process_count)
  # Arguments are checked above, eagerly; the generator below does the work.
  return _eval_batches(split, 2 if stage == "valid" else 1, max_len, global_batch_size,
                       process_index * local, local, history_len)


def _eval_batches(split: LeaveOneOutSplit, gap: int, max_len: int, g: int, lo: int, local: int,
                  history_len: int) -> Iterator[Dict[str, np.ndarray]]:
  """Generator behind ``eval_batches``; ``gap`` = distance of the target from the end."""
  items = split.dataset.items
  offsets = split.dataset.offsets
  users_all = split.eval_users
  for b in range(num_eval_batches(split, g)):
    users, weights = _pad_rows(users_all[b * g:(b + 1) * g], g)  # [G], [G]
    users, weights = users[lo:lo + local], weights[lo:lo + local]  # [b], [b]
    starts = offsets[users]                                      # [b]
    t = offsets[users + 1] - gap                                 # [b] target index
    batch = {
        "inputs": gather_windows(items, t, starts, max_len),     # [b, L]
        "targets": items[t].astype(np.int32),                    # [b]
        "users": users.astype(np.int32),                         # [b]
        "weights": weights,                                      # [b]
    }
    if history_len > 0:
      batch["history"] = gather_windows(items, t, starts, history_len)  # [b, H]
    yield batch
