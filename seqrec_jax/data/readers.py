"""Readers that turn benchmark files into a :class:`SequenceDataset`.

Three on-disk formats are supported:

* ``read_pairs``: one ``user item`` pair of integer ids per line, lines chronological per user
  (the SRA-CL / CoSeRec ``Beauty.txt`` format).
* ``read_recbole_atomic``: RecBole atomic files (``<name>.inter`` plus an optional
  ``<name>.item``), e.g. the ml-100k example shipped inside the RecBole wheel.
* ``read_p5``: ``sequences.txt`` (``user item item ...`` per line) plus ``items.tsv`` (item text).

All readers work on whole columns with numpy (no per-interaction Python work beyond the C-level
``str.split``/``int`` maps), keep the chronological order of each user stably, number users by
first appearance, and record what they read in ``dataset.stats``.  Malformed input raises
:class:`DataFormatError` naming ``file:line``.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np

from seqrec_jax.data.dataset import SequenceDataset
from seqrec_jax.data.errors import DataFormatError  # re-exported; shared with amazon.py

_PAD_TOKEN = "[PAD]"
_DIGITS_ONLY = re.compile(r"[^0-9\s]")   # any char that is neither an ASCII digit nor space
_INT_TOKEN = re.compile(r"[+-]?[0-9]+")

__all__ = ["DataFormatError", "default_ml100k_dir", "read_p5", "read_pairs",
           "read_recbole_atomic"]


# ------------------------------------------------------------------------------------------------
# Shared helpers.
# ------------------------------------------------------------------------------------------------


def _read_text(path: str) -> str:
  with open(path, "r", encoding="utf-8-sig", newline=None) as f:
    return f.read()


def _first_appearance_codes(values: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Dense codes 0..K-1 numbered by first appearance.

  Args:
    values: [N] array of hashable, sortable values (ints or fixed-width strings).

  Returns:
    (codes [N] int64, uniques [K] in order of first appearance).
  """
  uniq, first, inverse = np.unique(values, return_index=True, return_inverse=True)
  order = np.argsort(first, kind="stable")          # [K] unique index, by first appearance
  rank = np.empty(len(uniq), dtype=np.int64)
  rank[order] = np.arange(len(uniq), dtype=np.int64)
  return rank[inverse.reshape(-1)], uniq[order]


def _assemble(name: str,
              user_codes: np.ndarray,
              user_ids: Sequence[str],
              items: np.ndarray,
              item_ids: Optional[np.ndarray] = None,
              sort_key: Optional[np.ndarray] = None,
              item_text: Optional[Dict[str, List[str]]] = None,
              stats: Optional[Dict[str, int]] = None) -> SequenceDataset:
  """Groups interactions by user and numbers items densely.

  Args:
    name: dataset name.
    user_codes: [N] int64 dense user index (0..n_users-1) of every interaction, file order.
    user_ids: [n_users] original id of each user code.
    items: [N] item of every interaction, file order: original ids (ints or strings) when
      ``item_ids`` is None, else dense 0-based codes into ``item_ids``.
    item_ids: optional [n_items] original ids giving the dense numbering (dense id = position
      + 1).  Default: number ``items`` by first appearance in the user-grouped sequences.
    sort_key: optional [N] float key (timestamp) to sort by within each user; ties keep file
      order.  Without it each user keeps the file order.
    item_text: optional ``{field: [n_items + 1] list of str}`` aligned with the dense ids (only
      meaningful together with ``item_ids``).
    stats: reader counts.

  Returns:
    The SequenceDataset.
  """
  n_users = len(user_ids)
  if sort_key is None:
    order = np.argsort(user_codes, kind="stable")                # [N]
  else:
    order = np.lexsort((sort_key, user_codes))                   # [N], stable
  grouped = items[order]                                         # [N]
  counts = np.bincount(user_codes, minlength=n_users)            # [n_users]
  offsets = np.zeros(n_users + 1, dtype=np.int64)
  np.cumsum(counts, out=offsets[1:])
  if item_ids is None:
    codes, item_ids = _first_appearance_codes(grouped)
  else:
    codes = grouped
  all_ids = np.empty(len(item_ids) + 1, dtype=object)
  all_ids[0] = _PAD_TOKEN
  all_ids[1:] = [str(v) for v in np.asarray(item_ids).tolist()]
  stats = dict(stats or {})
  stats.update(users=int(n_users), items=int(len(item_ids)), interactions=int(len(grouped)))
  return SequenceDataset(
      name=name,
      items=(codes + 1).astype(np.int32),
      offsets=offsets,
      user_ids=np.asarray([str(u) for u in user_ids], dtype=object),
      item_ids=all_ids,
      item_text=item_text,
      stats=stats)


def _split_lines(text: str) -> Tuple[List[str], np.ndarray]:
  """Splits text into lines; returns (lines, [n_lines] bool is-blank)."""
  lines = text.splitlines()
  blank = np.fromiter(map(_is_blank, lines), dtype=bool, count=len(lines))
  return lines, blank


def _is_blank(line: str) -> bool:
  return not line.strip()


def _parse_tsv(path: str, text: str) -> Tuple[List[str], np.ndarray, np.ndarray, int]:
  """Parses a tab-separated file with a header row.

  Args:
    path: file path (for error messages).
    text: the file contents.

  Returns:
    (header fields, cells [n_rows, n_cols] str array, 1-based line numbers [n_rows] int64,
    number of blank lines skipped).

  Raises:
    DataFormatError: empty file, or a row whose column count differs from the header's.
  """
  base = os.path.basename(path)
  lines, blank = _split_lines(text)
  nonblank = np.flatnonzero(~blank)                              # [R + 1] line indices
  if len(nonblank) == 0:
    raise DataFormatError(f"{path}: empty file (expected a tab-separated header row)")
  header_idx = int(nonblank[0])
  header = lines[header_idx].split("\t")
  rows_idx = nonblank[1:]                                        # [R]
  rows = [lines[i] for i in rows_idx.tolist()]
  n_tabs = np.fromiter(map(_count_tabs, rows), dtype=np.int64, count=len(rows))
  bad = np.flatnonzero(n_tabs != len(header) - 1)
  if len(bad):
    i = int(bad[0])
    raise DataFormatError(
        f"{base}:{int(rows_idx[i]) + 1}: expected {len(header)} tab-separated "
        f"columns ({', '.join(header)}), got {int(n_tabs[i]) + 1}: {rows[i]!r}")
  if rows:
    cells = np.asarray("\t".join(rows).split("\t"), dtype=str).reshape(len(rows), len(header))
  else:
    cells = np.zeros((0, len(header)), dtype=str)
  return header, cells, rows_idx.astype(np.int64) + 1, int(blank.sum())


def _first_repeat(values: np.ndarray) -> Optional[int]:
  """Index of the first element whose value occurred earlier, or None if all are distinct."""
  _, first = np.unique(values, return_index=True)
  if len(first) == len(values):
    return None
  repeated = np.ones(len(values), dtype=bool)
  repeated[first] = False
  return int(np.flatnonzero(repeated)[0])


def _count_tabs(line: str) -> int:
  return line.count("\t")


# ------------------------------------------------------------------------------------------------
# `user item` pairs (SRA-CL / CoSeRec).
# ------------------------------------------------------------------------------------------------


def read_pairs(path: str, name: Optional[str] = None) -> SequenceDataset:
  """Reads a ``user item`` pair file (integer ids, lines chronological per user).

  Users are numbered by first appearance and each user's lines keep the file order.  If the item
  ids are exactly ``1..max`` they are kept as the dense ids; otherwise items are renumbered
  densely by first appearance in the user-grouped sequences.

  Args:
    path: the text file, e.g. ``Beauty.txt``.
    name: dataset name; default: the file stem, lower-cased.

  Returns:
    The SequenceDataset; ``stats`` has ``lines``, ``blank_lines``, ``renumbered_items`` (0/1),
    ``users``, ``items``, ``interactions``.

  Raises:
    DataFormatError: a line that is not two integers (message ``file:line``), or no pairs.
  """
  path = os.fspath(path)
  base = os.path.basename(path)
  if name is None:
    name = os.path.splitext(base)[0].lower()
  text = _read_text(path)
  lines = text.splitlines()
  n_tok = np.fromiter(map(len, map(str.split, lines)), dtype=np.int64,
                      count=len(lines))                          # [n_lines]
  blank = n_tok == 0
  bad = np.flatnonzero((n_tok != 0) & (n_tok != 2))
  if len(bad):
    i = int(bad[0])
    raise DataFormatError(f"{base}:{i + 1}: expected 'user item', got {lines[i].strip()!r}")
  pair_lines = np.flatnonzero(~blank)                            # [N] 0-based line index
  if len(pair_lines) == 0:
    raise DataFormatError(f"{path}: empty file (no 'user item' lines)")
  tokens = text.split()                                          # [2N]
  if len(tokens) != 2 * len(pair_lines):                         # e.g. exotic line breaks
    raise DataFormatError(f"{path}: could not split into 'user item' lines")
  if _DIGITS_ONLY.search(text) is not None:                      # rare: find the offending token
    for k, tok in enumerate(tokens):
      if _INT_TOKEN.fullmatch(tok) is None:
        i = int(pair_lines[k // 2])
        raise DataFormatError(
            f"{base}:{i + 1}: expected 'user item', got {lines[i].strip()!r}")
  try:
    ids = np.fromiter(map(int, tokens), dtype=np.int64, count=len(tokens))  # [2N]
  except OverflowError:
    raise DataFormatError(f"{path}: an id does not fit in int64") from None
  ids = ids.reshape(-1, 2)                                       # [N, 2]
  users, items = ids[:, 0], ids[:, 1]
  user_codes, user_uniq = _first_appearance_codes(users)
  max_item = int(items.max())
  distinct = np.unique(items)
  keep_ids = int(items.min()) == 1 and len(distinct) == max_item
  stats = dict(lines=len(lines), blank_lines=int(blank.sum()),
               renumbered_items=int(not keep_ids))
  if keep_ids:
    item_codes, item_ids = items - 1, np.arange(1, max_item + 1, dtype=np.int64)
  else:
    item_codes, item_ids = items, None
    logging.info("%s: item ids are not exactly 1..%d (%d distinct); renumbering densely by "
                 "first appearance", base, max_item, len(distinct))
  ds = _assemble(name, user_codes, user_uniq.tolist(), item_codes, item_ids=item_ids,
                 stats=stats)
  logging.info("read_pairs(%s): %s; %d lines, %d blank", path, ds.summary(), len(lines),
               stats["blank_lines"])
  return ds


# ------------------------------------------------------------------------------------------------
# RecBole atomic files.
# ------------------------------------------------------------------------------------------------


def default_ml100k_dir() -> str:
  """The ml-100k example directory inside the installed RecBole wheel (without importing it).

  Returns:
    ``<site-packages>/recbole/dataset_example/ml-100k``.

  Raises:
    FileNotFoundError: RecBole is not installed or has no ml-100k example.
  """
  spec = importlib.util.find_spec("recbole")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "ml-100k is read from the RecBole wheel, which is not installed: "
        "pip install --no-deps recbole==1.2.1")
  for pkg_dir in spec.submodule_search_locations:
    d = os.path.join(pkg_dir, "dataset_example", "ml-100k")
    if os.path.isfile(os.path.join(d, "ml-100k.inter")):
      return d
  raise FileNotFoundError(
      f"RecBole is installed at {list(spec.submodule_search_locations)} but has no "
      "dataset_example/ml-100k/ml-100k.inter; pip install --no-deps recbole==1.2.1")


def _field_names(header: Sequence[str]) -> List[str]:
  return [h.split(":", 1)[0].strip() for h in header]


def read_recbole_atomic(path_or_dir: str, name: Optional[str] = None) -> SequenceDataset:
  """Reads RecBole atomic files ``<dir>/<name>.inter`` and optional ``<dir>/<name>.item``.

  The ``.inter`` header names typed fields (``user_id:token  item_id:token  rating:float
  timestamp:float``); ``user_id`` and ``item_id`` are required.  Interactions are sorted stably
  by (user, timestamp) (file order within a user when there is no ``timestamp`` field).  All
  interactions are kept (no rating filter).  Users and items are numbered by first appearance
  (items in the user-grouped chronological sequences).  Every ``.item`` field except ``item_id``
  becomes an ``item_text`` field under its name without the ``:type`` suffix; items without a
  ``.item`` row get "".

  Args:
    path_or_dir: the dataset directory, or the ``.inter`` file itself.
    name: the file prefix; default: the directory's base name (or the ``.inter`` file's stem).

  Returns:
    The SequenceDataset; ``stats`` has ``inter_rows``, ``blank_lines``, ``item_rows``,
    ``items_without_text``, ``item_rows_unused``, ``users``, ``items``, ``interactions``.

  Raises:
    FileNotFoundError: no ``.inter`` file.
    DataFormatError: missing required fields, a row with the wrong column count, a bad
      timestamp, a duplicate ``.item`` row.
  """
  path_or_dir = os.fspath(path_or_dir)
  if os.path.isdir(path_or_dir):
    directory = path_or_dir
    if name is None:
      name = os.path.basename(os.path.normpath(directory))
    inter_path = os.path.join(directory, f"{name}.inter")
  else:
    inter_path = path_or_dir
    directory = os.path.dirname(inter_path)
    if name is None:
      name = os.path.splitext(os.path.basename(inter_path))[0]
  if not os.path.isfile(inter_path):
    raise FileNotFoundError(f"RecBole .inter file not found: {inter_path}")
  item_path = os.path.join(directory, f"{name}.item")
  base = os.path.basename(inter_path)

  header, cells, line_no, n_blank = _parse_tsv(inter_path, _read_text(inter_path))
  fields = _field_names(header)
  for required in ("user_id", "item_id"):
    if required not in fields:
      raise DataFormatError(f"{base}:1: header has no {required!r} field: {header}")
  if len(cells) == 0:
    raise DataFormatError(f"{inter_path}: no interactions")
  users = cells[:, fields.index("user_id")]                      # [N] str
  items = cells[:, fields.index("item_id")]                      # [N] str
  sort_key = None
  if "timestamp" in fields:
    ts_col = cells[:, fields.index("timestamp")]
    try:
      sort_key = ts_col.astype(np.float64)                       # [N]
    except ValueError:
      for k, v in enumerate(ts_col.tolist()):
        try:
          float(v)
        except ValueError:
          raise DataFormatError(
              f"{base}:{int(line_no[k])}: timestamp {v!r} is not a number") from None
      raise
  user_codes, user_uniq = _first_appearance_codes(users)
  stats = dict(inter_rows=len(cells), blank_lines=n_blank)

  ds = _assemble(name, user_codes, user_uniq.tolist(), items, sort_key=sort_key, stats=stats)
  if os.path.isfile(item_path):
    ds = _attach_atomic_item_text(ds, item_path)
  else:
    logging.info("%s: no %s, no item text", base, os.path.basename(item_path))
  logging.info("read_recbole_atomic(%s): %s", inter_path, ds.summary())
  return ds


def _attach_atomic_item_text(ds: SequenceDataset, item_path: str) -> SequenceDataset:
  """Returns ``ds`` with ``item_text`` read from a RecBole ``.item`` file."""
  base = os.path.basename(item_path)
  header, cells, line_no, _ = _parse_tsv(item_path, _read_text(item_path))
  fields = _field_names(header)
  if "item_id" not in fields:
    raise DataFormatError(f"{base}:1: header has no 'item_id' field: {header}")
  id_col = fields.index("item_id")
  ids = cells[:, id_col]                                         # [R]
  k = _first_repeat(ids)
  if k is not None:
    raise DataFormatError(f"{base}:{int(line_no[k])}: duplicate item_id {str(ids[k])!r}")
  row_of = dict(zip(ids.tolist(), range(len(ids))))
  dense_rows = np.fromiter((row_of.get(i, -1) for i in ds.item_ids[1:].tolist()),
                           dtype=np.int64, count=ds.n_items)     # [n_items]
  missing = int((dense_rows < 0).sum())
  text = {}
  for c, field in enumerate(fields):
    if c == id_col:
      continue
    col = np.concatenate([cells[:, c], np.array([""], dtype=cells.dtype)])
    values = col[dense_rows]                                     # -1 -> the "" sentinel
    text[field] = [""] + values.tolist()
  stats = dict(ds.stats)
  stats.update(item_rows=len(ids), items_without_text=missing,
               item_rows_unused=len(ids) - (ds.n_items - missing))
  if missing:
    logging.info("%s: %d of %d items in the interactions have no row (empty text)", base,
                 missing, ds.n_items)
  return SequenceDataset(name=ds.name, items=ds.items, offsets=ds.offsets,
                         user_ids=ds.user_ids, item_ids=ds.item_ids, item_text=text,
                         stats=stats)


# ------------------------------------------------------------------------------------------------
# P5-style sequences.txt + items.tsv.
# ------------------------------------------------------------------------------------------------


def read_p5(directory: str, name: Optional[str] = None) -> SequenceDataset:
  """Reads ``<dir>/sequences.txt`` and ``<dir>/items.tsv``.

  ``sequences.txt`` has one user per line, ``user_id item_id item_id ...`` (whitespace-separated
  string ids, chronological).  ``items.tsv`` has a header row containing ``item_id``; its other
  columns become ``item_text`` fields.  Dense item ids follow the ``items.tsv`` row order,
  restricted to items that occur in ``sequences.txt``.

  Args:
    directory: the dataset directory.
    name: dataset name; default: the directory's base name.

  Returns:
    The SequenceDataset; ``stats`` has ``lines``, ``blank_lines``, ``item_rows``,
    ``item_rows_unused``, ``users``, ``items``, ``interactions``.

  Raises:
    FileNotFoundError: a file is missing.
    DataFormatError: a user line without items, a user on two lines, an item missing from
      ``items.tsv``, a malformed or duplicate ``items.tsv`` row.
  """
  directory = os.fspath(directory)
  if name is None:
    name = os.path.basename(os.path.normpath(directory))
  seq_path = os.path.join(directory, "sequences.txt")
  tsv_path = os.path.join(directory, "items.tsv")
  for p in (seq_path, tsv_path):
    if not os.path.isfile(p):
      raise FileNotFoundError(f"P5 dataset file not found: {p}")
  seq_base = os.path.basename(seq_path)
  tsv_base = os.path.basename(tsv_path)

  # items.tsv
  header, cells, tsv_line, _ = _parse_tsv(tsv_path, _read_text(tsv_path))
  fields = [h.strip() for h in header]
  if "item_id" not in fields:
    raise DataFormatError(f"{tsv_base}:1: header has no 'item_id' column: {header}")
  id_col = fields.index("item_id")
  tsv_ids = cells[:, id_col]                                     # [R]
  k = _first_repeat(tsv_ids)
  if k is not None:
    raise DataFormatError(
        f"{tsv_base}:{int(tsv_line[k])}: duplicate item_id {str(tsv_ids[k])!r}")

  # sequences.txt
  text = _read_text(seq_path)
  lines = text.splitlines()
  n_tok = np.fromiter(map(len, map(str.split, lines)), dtype=np.int64,
                      count=len(lines))                          # [n_lines]
  short = np.flatnonzero(n_tok == 1)
  if len(short):
    i = int(short[0])
    raise DataFormatError(
        f"{seq_base}:{i + 1}: user {lines[i].strip()!r} has no items "
        "(expected 'user_id item_id item_id ...')")
  user_lines = np.flatnonzero(n_tok > 0)                         # [U] 0-based line index
  if len(user_lines) == 0:
    raise DataFormatError(f"{seq_path}: empty file (no user lines)")
  tokens = np.asarray(text.split(), dtype=str)                   # [T]
  counts = n_tok[user_lines]                                     # [U]
  if len(tokens) != int(counts.sum()):
    raise DataFormatError(f"{seq_path}: could not split into lines of ids")
  starts = np.zeros(len(counts), dtype=np.int64)
  np.cumsum(counts[:-1], out=starts[1:])
  is_user = np.zeros(len(tokens), dtype=bool)
  is_user[starts] = True
  user_tok = tokens[starts]                                      # [U]
  item_tok = tokens[~is_user]                                    # [N]
  item_line = np.repeat(user_lines, counts - 1) + 1              # [N] 1-based line numbers
  user_codes_line, user_uniq = _first_appearance_codes(user_tok)
  k = _first_repeat(user_tok)
  if k is not None:
    prev = int(user_lines[np.flatnonzero(user_tok == user_tok[k])[0]]) + 1
    raise DataFormatError(
        f"{seq_base}:{int(user_lines[k]) + 1}: user {str(user_tok[k])!r} already has a line "
        f"({seq_base}:{prev})")
  user_codes = np.repeat(user_codes_line, counts - 1)            # [N]

  # Items: every sequence item must have an items.tsv row.
  item_uniq, item_first, item_inv = np.unique(item_tok, return_index=True,
                                              return_inverse=True)  # [K], [K], [N]
  sorter = np.argsort(tsv_ids, kind="stable")
  pos = np.searchsorted(tsv_ids, item_uniq, sorter=sorter)      # [K]
  pos = np.minimum(pos, max(len(tsv_ids) - 1, 0))
  found = (tsv_ids[sorter[pos]] == item_uniq) if len(tsv_ids) else np.zeros(len(item_uniq), bool)
  if not np.all(found):
    k = int(item_first[~found].min())
    raise DataFormatError(
        f"{seq_base}:{int(item_line[k])}: item {str(item_tok[k])!r} is not in {tsv_base}")
  tsv_row = sorter[pos]                                          # [K] row of each used item
  by_row = np.argsort(tsv_row, kind="stable")                    # dense order = tsv row order
  rank = np.empty(len(item_uniq), dtype=np.int64)
  rank[by_row] = np.arange(len(item_uniq), dtype=np.int64)       # [K] dense code of each unique
  used_rows = tsv_row[by_row]                                    # [K]
  item_text = {}
  for c, field in enumerate(fields):
    if c != id_col:
      item_text[field] = [""] + cells[used_rows, c].tolist()
  stats = dict(lines=len(lines), blank_lines=int((n_tok == 0).sum()), item_rows=len(tsv_ids),
               item_rows_unused=len(tsv_ids) - len(item_uniq))
  ds = _assemble(name, user_codes, user_uniq.tolist(), rank[item_inv.reshape(-1)],
                 item_ids=tsv_ids[used_rows], item_text=item_text, stats=stats)
  logging.info("read_p5(%s): %s; %d unused items.tsv rows", directory, ds.summary(),
               stats["item_rows_unused"])
  return ds
