"""Leave-one-out split, as in SRA-CL / CoSeRec (see REFERENCE_NOTES.md).

For a user with ``n >= 3`` interactions the last item is the test target, the second-to-last
the validation target, and the first ``n - 2`` items are the training part.  Training examples
are every prefix of the training part, with targets from its 2nd item on.  Users with fewer than
3 interactions are either trained on all their interactions and not evaluated (``"train_only"``,
the reference behaviour) or excluded entirely (``"drop"``).

Nothing is copied: examples are absolute indices into ``dataset.items``.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from absl import logging
import numpy as np

from seqrec_jax.data.dataset import SequenceDataset

SHORT_USER_MODES = ("train_only", "drop")
MIN_EVAL_LENGTH = 3


@dataclasses.dataclass(frozen=True)
class LeaveOneOutSplit:
  """Index view of a leave-one-out split.

  Attributes:
    dataset: the underlying dataset.
    train_end: [n_users] int64 absolute index into ``dataset.items`` where the user's training
      part ends (exclusive): ``offsets[u + 1] - 2`` for evaluated users, ``offsets[u + 1]`` for
      train-only short users, ``offsets[u]`` for dropped users.
    eval_users: [n_eval] int32 users with >= 3 interactions (evaluated on valid and test).
    train_targets: [n_train] int64 absolute index ``t`` of every training target:
      ``offsets[u] < t < train_end[u]``; grouped by user, increasing.
    train_users: [n_train] int32 user of each training target.
    stats: counts (users, eval_users, short_users, train_examples, ...).
  """

  dataset: SequenceDataset
  train_end: np.ndarray
  eval_users: np.ndarray
  train_targets: np.ndarray
  train_users: np.ndarray
  stats: Mapping[str, int] = dataclasses.field(default_factory=dict)

  @property
  def n_train(self) -> int:
    return len(self.train_targets)

  @property
  def n_eval(self) -> int:
    return len(self.eval_users)


def leave_one_out(dataset: SequenceDataset, short_users: str = "train_only") -> LeaveOneOutSplit:
  """Splits every user's sequence leave-one-out.

  Args:
    dataset: the dataset.
    short_users: what to do with users with fewer than 3 interactions: ``"train_only"`` (train
      on all of them, not evaluated; reference behaviour) or ``"drop"`` (no training examples,
      not evaluated).

  Returns:
    The LeaveOneOutSplit.

  Raises:
    ValueError: unknown ``short_users`` mode, or no training example at all.
  """
  if short_users not in SHORT_USER_MODES:
    raise ValueError(
        f"short_users must be one of {SHORT_USER_MODES}, got {short_users!r}")
  starts = dataset.offsets[:-1]                                  # [n_users]
  ends = dataset.offsets[1:]                                     # [n_users]
  lengths = ends - starts                                        # [n_users]
  evaluated = lengths >= MIN_EVAL_LENGTH                         # [n_users]
  n_short = int((~evaluated).sum())
  if short_users == "train_only":
    short_end = ends
  else:
    short_end = starts
  train_end = np.where(evaluated, ends - 2, short_end).astype(np.int64)  # [n_users]

  # Targets t in (start, train_end): one run of consecutive indices per user.
  n_per_user = np.maximum(train_end - starts - 1, 0)             # [n_users]
  n_train = int(n_per_user.sum())
  run_start = np.zeros(len(n_per_user), dtype=np.int64)          # [n_users] first row of run
  np.cumsum(n_per_user[:-1], out=run_start[1:])
  train_users = np.repeat(np.arange(dataset.n_users, dtype=np.int32), n_per_user)  # [n_train]
  within = np.arange(n_train, dtype=np.int64) - np.repeat(run_start, n_per_user)   # [n_train]
  train_targets = np.repeat(starts + 1, n_per_user) + within     # [n_train]
  eval_users = np.flatnonzero(evaluated).astype(np.int32)        # [n_eval]

  stats = dict(
      users=int(dataset.n_users),
      eval_users=int(len(eval_users)),
      short_users=n_short,
      short_users_dropped=n_short if short_users == "drop" else 0,
      short_users_train_only=n_short if short_users == "train_only" else 0,
      users_without_train_examples=int((n_per_user == 0).sum()),
      train_examples=n_train)
  if n_short:
    logging.info(
        "%s: %d users with fewer than %d interactions: %s", dataset.name, n_short,
        MIN_EVAL_LENGTH,
        "trained on all of them, not evaluated" if short_users == "train_only" else
        "dropped (no training, no evaluation)")
  logging.info("%s: leave-one-out: %d training examples, %d evaluated users", dataset.name,
               n_train, len(eval_users))
  if n_train == 0:
    raise ValueError(
        f"{dataset.name}: leave-one-out split has no training examples "
        f"({dataset.n_users} users, short_users={short_users!r})")
  return LeaveOneOutSplit(dataset=dataset, train_end=train_end, eval_users=eval_users,
                          train_targets=train_targets, train_users=train_users, stats=stats)
