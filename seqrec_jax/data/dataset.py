"""The in-memory sequence dataset every reader produces.

Layout is CSR ("compressed sparse rows"): the chronological item sequences of all users are
concatenated into one int32 array, and ``offsets[u]:offsets[u + 1]`` is user ``u``'s slice.  Host
memory is O(#interactions); nothing downstream ever materialises per-prefix copies.

Item ids are dense integers ``1..n_items``; id 0 is reserved for padding.  Original (string) ids
are kept so that predictions can be mapped back.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import numpy as np

PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class SequenceDataset:
  """Chronological item sequences of all users.

  Attributes:
    name: a short name for logs ("beauty", "ml-100k").
    items: [n_interactions] int32, dense item ids in 1..n_items, grouped by user, each user's
      slice in chronological order.
    offsets: [n_users + 1] int64, user u's items are ``items[offsets[u]:offsets[u + 1]]``.
    user_ids: [n_users] original user ids (str), in the order of ``offsets``.
    item_ids: [n_items + 1] original item ids (str); ``item_ids[0]`` is "[PAD]".
    item_text: optional per-item text fields, ``{field: [n_items + 1] list of str}`` (row 0 is
      ""); e.g. {"title": ..., "categories": ...}.  Missing values are "".
    stats: counts logged by the reader (rows read, rows dropped by each documented rule, ...).
  """

  name: str
  items: np.ndarray
  offsets: np.ndarray
  user_ids: np.ndarray
  item_ids: np.ndarray
  item_text: Optional[Mapping[str, Sequence[str]]] = None
  stats: Mapping[str, int] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.items.ndim != 1 or self.offsets.ndim != 1:
      raise ValueError("items and offsets must be 1-D arrays")
    if len(self.offsets) != len(self.user_ids) + 1:
      raise ValueError(
          f"offsets has {len(self.offsets)} entries for {len(self.user_ids)} users "
          "(expected n_users + 1)")
    if self.offsets[0] != 0 or self.offsets[-1] != len(self.items):
      raise ValueError("offsets must start at 0 and end at len(items)")
    if np.any(np.diff(self.offsets) < 0):
      raise ValueError("offsets must be non-decreasing")
    if len(self.items) and (self.items.min() < 1 or self.items.max() >= len(self.item_ids)):
      raise ValueError(
          f"item ids must lie in 1..{len(self.item_ids) - 1}, got "
          f"[{self.items.min()}, {self.items.max()}]")
    if self.item_text is not None:
      for field, values in self.item_text.items():
        if len(values) != len(self.item_ids):
          raise ValueError(
              f"item_text[{field!r}] has {len(values)} rows, expected {len(self.item_ids)}")

  @property
  def n_users(self) -> int:
    return len(self.user_ids)

  @property
  def n_items(self) -> int:
    """Number of real items (ids 1..n_items); the embedding table has n_items + 1 rows."""
    return len(self.item_ids) - 1

  @property
  def n_interactions(self) -> int:
    return len(self.items)

  @property
  def lengths(self) -> np.ndarray:
    """[n_users] int64 sequence length of every user."""
    return np.diff(self.offsets)

  def sequence(self, user: int) -> np.ndarray:
    """The chronological item ids of user index ``user``."""
    return self.items[self.offsets[user]:self.offsets[user + 1]]

  def summary(self) -> str:
    return (f"{self.name}: {self.n_users:,} users, {self.n_items:,} items, "
            f"{self.n_interactions:,} interactions")


def from_sequences(name: str,
                   sequences: Sequence[Sequence[str]],
                   user_ids: Sequence[str],
                   item_order: Optional[Sequence[str]] = None,
                   item_text: Optional[Mapping[str, Mapping[str, str]]] = None,
                   stats: Optional[Mapping[str, int]] = None) -> SequenceDataset:
  """Builds a dataset from per-user lists of original item ids.

  Args:
    name: dataset name.
    sequences: one chronological list of original item ids per user.
    user_ids: original user id of each sequence.
    item_order: optional order of original item ids for the dense numbering; default: order of
      first appearance in ``sequences``.
    item_text: optional ``{field: {original_item_id: text}}``; missing items get "".
    stats: reader counts to keep.

  Returns:
    A SequenceDataset with dense ids 1..n_items.
  """
  if item_order is None:
    vocab: dict = {}
    for seq in sequences:
      for it in seq:
        if it not in vocab:
          vocab[it] = len(vocab) + 1
  else:
    vocab = {it: i + 1 for i, it in enumerate(item_order)}
  lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
  offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
  np.cumsum(lengths, out=offsets[1:])
  items = np.fromiter((vocab[it] for seq in sequences for it in seq), dtype=np.int32,
                      count=int(offsets[-1]))
  item_ids = np.empty(len(vocab) + 1, dtype=object)
  item_ids[0] = "[PAD]"
  for it, i in vocab.items():
    item_ids[i] = str(it)
  text = None
  if item_text is not None:
    text = {}
    for field, mapping in item_text.items():
      col = [""] * len(item_ids)
      for i in range(1, len(item_ids)):
        col[i] = mapping.get(item_ids[i], "") or ""
      text[field] = col
  return SequenceDataset(name=name, items=items, offsets=offsets,
                         user_ids=np.asarray([str(u) for u in user_ids], dtype=object),
                         item_ids=item_ids, item_text=text, stats=dict(stats or {}))
