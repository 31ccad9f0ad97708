"""Reader for the raw Amazon review dumps (2014, 2018 and 2023 releases) and their metadata.

Formats (auto-detected per file from its first record; files may be gzip-compressed or plain,
detected from the gzip magic bytes rather than the file name):

* 2014 (McAuley et al.), ``reviews_<Cat>_5.json.gz`` / ``meta_<Cat>.json.gz``: reviews have
  ``reviewerID``, ``asin``, ``overall``, ``unixReviewTime`` (seconds).  Metadata lines are *Python
  literals* (single quotes), with ``asin``, ``title``, ``brand``, ``categories`` (list of category
  paths, each a list of str), ``price`` (float), ``description`` (str).  Some review files are
  Python literals too: every line is tried as JSON first, then with ``ast.literal_eval`` (and a file
  that needed the fallback tries it first from then on).
* 2018 (Ni et al.), ``<Cat>_5.json.gz`` / ``meta_<Cat>.json.gz``: JSON lines; reviews as in 2014;
  metadata with ``asin``, ``title``, ``brand``, ``category`` (list of str), ``price`` (str such as
  "$12.99" or ""), ``description`` (list of str), ``main_cat``.
* 2023 (Hou et al.), ``<Cat>.jsonl.gz`` / ``meta_<Cat>.jsonl.gz``: JSON lines; reviews with
  ``user_id``, ``parent_asin``, ``asin``, ``rating``, ``timestamp`` (milliseconds); metadata with
  ``parent_asin``, ``title``, ``store``, ``categories`` (list of str), ``main_category``,
  ``price`` (float or null), ``description`` (list of str).  Items are keyed by ``parent_asin``.

Pipeline: parse reviews (streaming) -> optional ``min_rating`` filter -> iterated k-core on users and
items -> dense ids (users and items numbered in lexicographic order of their original ids) ->
per-user sequences sorted by time with a stable sort (equal timestamps keep file order) -> item text
from the metadata for the surviving items only.

Timestamps are compared in the unit of the file (2023: milliseconds, not truncated to seconds).
"""

from __future__ import annotations

import array
import ast
import gzip
import html
import json
import os
import re
from typing import Iterator, Optional, Tuple

from absl import logging
import numpy as np
from tqdm import tqdm

from seqrec_jax.data.dataset import SequenceDataset
from seqrec_jax.data.errors import DataFormatError

TEXT_FIELDS = ("title", "brand", "categories", "price", "description")
MAX_DESCRIPTION_CHARS = 2000

# Review schemas: (user key, item key, time key, rating key).
_REVIEW_KEYS_2023 = ("user_id", "parent_asin", "timestamp", "rating")
_REVIEW_KEYS_2014 = ("reviewerID", "asin", "unixReviewTime", "overall")

_GZIP_MAGIC = b"\x1f\x8b"
_PROGRESS_EVERY = 1 << 14


# ----------------------------------------------------------------------------------------------
# Line reading and record parsing.


def _iter_lines(path: str, desc: str) -> Iterator[Tuple[int, bytes]]:
  """Yields ``(lineno, raw line bytes)`` of a plain or gzip file, with a byte-progress bar."""
  size = os.path.getsize(path)
  with open(path, "rb") as raw:
    is_gzip = raw.read(2) == _GZIP_MAGIC
    raw.seek(0)
    stream = gzip.GzipFile(fileobj=raw, mode="rb") if is_gzip else raw
    # Progress is measured in bytes of the file on disk (compressed bytes for .gz).
    with tqdm(total=size, unit="B", unit_scale=True, desc=desc, disable=None,
              leave=False) as bar:
      done = 0
      try:
        for lineno, line in enumerate(stream, 1):
          yield lineno, line
          if lineno % _PROGRESS_EVERY == 0:
            pos = raw.tell()
            bar.update(pos - done)
            done = pos
      except (OSError, EOFError) as e:  # truncated / corrupt gzip stream
        raise DataFormatError(f"{os.path.basename(path)}: cannot read file ({e})") from e
      finally:
        if stream is not raw:
          stream.close()
      bar.update(max(size - done, 0))


class _RecordParser:
  """Parses one line into a dict: JSON first, then a Python literal (2014 metadata style)."""

  def __init__(self, path: str):
    self.base = os.path.basename(path)
    self.literal_first = False

  def where(self, lineno: int) -> str:
    return f"{self.base}:{lineno}"

  def __call__(self, line: bytes, lineno: int) -> dict:
    try:
      text = line.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataFormatError(f"{self.where(lineno)}: line is not valid UTF-8 ({e})") from None
    rec = None
    if self.literal_first:
      rec = _try_literal(text)
      if rec is None:
        rec = _try_json(text)
    else:
      rec = _try_json(text)
      if rec is None:
        rec = _try_literal(text)
        if rec is not None:
          self.literal_first = True
    if not isinstance(rec, dict):
      snippet = text.strip()
      if len(snippet) > 80:
        snippet = snippet[:77] + "..."
      raise DataFormatError(
          f"{self.where(lineno)}: expected one JSON object or Python dict literal per line, "
          f"got {snippet!r}")
    return rec


def _try_json(text: str):
  try:
    return json.loads(text)
  except ValueError:
    return None


def _try_literal(text: str):
  try:
    return ast.literal_eval(text.strip())
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return None


def _review_format(rec: dict) -> int:
  """2023, 2018, 2014 (best guess from the optional keys; 2014 and 2018 share the schema)."""
  if "user_id" in rec:
    return 2023
  if "verified" in rec or "vote" in rec or "style" in rec:
    return 2018
  return 2014


def _meta_format(rec: dict) -> int:
  if "parent_asin" in rec:
    return 2023
  cats = rec.get("categories")
  if isinstance(cats, list) and any(isinstance(c, list) for c in cats):
    return 2014
  if "category" in rec or "main_cat" in rec:
    return 2018
  return 2014 if "categories" in rec or "salesRank" in rec else 0


# ----------------------------------------------------------------------------------------------
# k-core.


def k_core_filter(users: np.ndarray, items: np.ndarray, k: int) -> Tuple[np.ndarray, int]:
  """Iterated k-core: drops rows of users and items with fewer than ``k`` rows until stable.

  Each pass counts rows per user and per item over the rows still kept (``np.bincount``) and drops
  every row whose user or item is below ``k``; passes repeat until one drops nothing.

  Args:
    users: [n] non-negative integer user codes.
    items: [n] non-negative integer item codes.
    k: minimum number of rows per user and per item; ``k <= 1`` keeps everything.

  Returns:
    ``(kept, iterations)``: increasing indices of the kept rows, and the number of passes that
    dropped at least one row (0 when the input already is a k-core).
  """
  users = np.asarray(users)
  items = np.asarray(items)
  if users.shape != items.shape or users.ndim != 1:
    raise ValueError("users and items must be 1-D arrays of equal length")
  kept = np.arange(len(users), dtype=np.int64)
  if k <= 1 or len(users) == 0:
    return kept, 0
  n_users = int(users.max()) + 1
  n_items = int(items.max()) + 1
  u, i = users, items
  iterations = 0
  while len(kept):
    ok = (np.bincount(u, minlength=n_users)[u] >= k) & (np.bincount(i, minlength=n_items)[i] >= k)
    if ok.all():
      break
    iterations += 1
    kept, u, i = kept[ok], u[ok], i[ok]
  return kept, iterations


# ----------------------------------------------------------------------------------------------
# Item text.


def _clean(value) -> str:
  """str, HTML entities unescaped, whitespace collapsed; None -> ""."""
  if value is None:
    return ""
  s = value if isinstance(value, str) else str(value)
  if "&" in s:
    s = html.unescape(s)
  return " ".join(s.split())


def _categories_text(rec: dict) -> str:
  cats = rec.get("categories")
  if cats is None:
    cats = rec.get("category")
  text = ""
  if isinstance(cats, str):
    text = _clean(cats)
  elif isinstance(cats, (list, tuple)) and cats:
    if any(isinstance(c, (list, tuple)) for c in cats):  # 2014: list of category paths
      paths = []
      for path in cats:
        parts = [_clean(c) for c in (path if isinstance(path, (list, tuple)) else [path])]
        joined = " > ".join(p for p in parts if p)
        if joined:
          paths.append(joined)
      text = " | ".join(paths)
    else:  # 2018 / 2023: one path
      text = " > ".join(p for p in (_clean(c) for c in cats) if p)
  if not text:
    # Fall back on the main category (2023 "main_category", 2018 "main_cat"); 2018 sometimes holds
    # an HTML <img> tag there instead of a name, which is ignored.
    main = _clean(rec.get("main_category") or rec.get("main_cat"))
    if main and not main.startswith("<"):
      text = main
  return text


def _price_text(value) -> str:
  if value is None or isinstance(value, bool):
    return ""
  if isinstance(value, (int, float)):
    return "" if value != value else f"{float(value):.2f}"  # NaN -> ""
  s = _clean(value)
  return "" if s.lower() in ("none", "null", "nan") else s


def _description_text(value) -> str:
  if isinstance(value, (list, tuple)):
    value = " ".join(_clean(v) for v in value)
  s = _clean(value)
  return s[:MAX_DESCRIPTION_CHARS].rstrip()


def item_text_fields(rec: dict) -> Tuple[str, str, str, str, str]:
  """(title, brand, categories, price, description) of one metadata record, any format."""
  brand = rec.get("brand")
  if brand is None or brand == "":
    brand = rec.get("store")
  return (_clean(rec.get("title")), _clean(brand), _categories_text(rec),
          _price_text(rec.get("price")), _description_text(rec.get("description")))


# ----------------------------------------------------------------------------------------------
# Reader.


def _default_name(path: str) -> str:
  name = os.path.basename(path)
  for suffix in (".gz", ".jsonl", ".json", ".txt"):
    if name.endswith(suffix):
      name = name[:-len(suffix)]
  if name.startswith("reviews_"):
    name = name[len("reviews_"):]
  if name.endswith("_5"):
    name = name[:-2]
  return name.lower() or "amazon"


def _read_reviews(path: str, min_rating: Optional[float], stats: dict):
  """Streams a review file into interned integer codes.  Returns arrays and the id vocabularies."""
  parser = _RecordParser(path)
  user_vocab: dict = {}
  item_vocab: dict = {}
  u_codes = array.array("q")
  i_codes = array.array("q")
  times = array.array("q")
  keys = None
  rows_read = below = 0
  for lineno, line in _iter_lines(path, f"reading {parser.base}"):
    if not line.strip():
      continue
    rec = parser(line, lineno)
    if keys is None:
      fmt = _review_format(rec)
      keys = _REVIEW_KEYS_2023 if fmt == 2023 else _REVIEW_KEYS_2014
      stats["reviews_format"] = fmt
      logging.info("%s: Amazon %d review format (keys %s)", parser.base, fmt, keys[:3])
    ukey, ikey, tkey, rkey = keys
    user = rec.get(ukey)
    item = rec.get(ikey)
    t = rec.get(tkey)
    if user is None or item is None or t is None or user == "" or item == "":
      missing = [k for k, v in ((ukey, user), (ikey, item), (tkey, t)) if v is None or v == ""]
      raise DataFormatError(
          f"{parser.where(lineno)}: review is missing {', '.join(repr(m) for m in missing)} "
          f"(expected keys {ukey!r}, {ikey!r}, {tkey!r}, as on line 1's format)")
    try:
      t = int(t)
    except (TypeError, ValueError):
      raise DataFormatError(
          f"{parser.where(lineno)}: {tkey!r} must be an integer timestamp, got {t!r}") from None
    rows_read += 1
    if min_rating is not None:
      r = rec.get(rkey)
      try:
        r = float(r)
      except (TypeError, ValueError):
        raise DataFormatError(
            f"{parser.where(lineno)}: min_rating is set but {rkey!r} is missing or not a number "
            f"(got {r!r})") from None
      if r < min_rating:
        below += 1
        continue
    if not isinstance(user, str):
      user = str(user)
    if not isinstance(item, str):
      item = str(item)
    u_codes.append(user_vocab.setdefault(user, len(user_vocab)))
    i_codes.append(item_vocab.setdefault(item, len(item_vocab)))
    times.append(t)
  if keys is None:
    raise DataFormatError(f"{parser.base}: empty file (no review records)")
  stats["rows_read"] = rows_read
  stats["rows_below_min_rating"] = below
  return (np.frombuffer(u_codes, dtype=np.int64), np.frombuffer(i_codes, dtype=np.int64),
          np.frombuffer(times, dtype=np.int64), user_vocab, item_vocab)


_META_KEY_RE = {
    key: re.compile(rb"""["']""" + key.encode() + rb"""["']\s*:\s*["']([^"'\\]+)["']""")
    for key in ("asin", "parent_asin")
}


def _read_meta(path: str, needed: set, stats: dict) -> dict:
  """{item id: text fields} for the ``needed`` item ids found in a metadata file.

  Lines whose item id (found with a cheap regex) is not needed are skipped without being parsed, so
  a malformed line is only reported when it belongs to a needed item or its id cannot be found.
  The first record of an item wins when the file repeats it (2018 metadata does).
  """
  parser = _RecordParser(path)
  found: dict = {}
  key = None
  key_re = None
  lines = duplicates = 0
  for lineno, line in _iter_lines(path, f"reading {parser.base}"):
    if not line.strip():
      continue
    lines += 1
    if key_re is not None:
      m = key_re.search(line)
      if m is not None:
        try:
          if m.group(1).decode("utf-8") not in needed:
            continue
        except UnicodeDecodeError:
          pass
    rec = parser(line, lineno)
    if key is None:
      fmt = _meta_format(rec)
      stats["meta_format"] = fmt
      key = "parent_asin" if "parent_asin" in rec else "asin"
      key_re = _META_KEY_RE[key]
      logging.info("%s: Amazon %s metadata format, items keyed by %r", parser.base,
                   fmt or "unknown", key)
    item = rec.get(key)
    if item is None or item == "":
      raise DataFormatError(f"{parser.where(lineno)}: metadata record has no {key!r} "
                            f"(expected as on line 1's format)")
    item = item if isinstance(item, str) else str(item)
    if item not in needed:
      continue
    if item in found:
      duplicates += 1
      continue
    found[item] = item_text_fields(rec)
  if key is None:
    raise DataFormatError(f"{parser.base}: empty file (no metadata records)")
  stats["meta_rows_read"] = lines
  stats["meta_duplicate_items"] = duplicates
  return found


def _dense_codes(codes: np.ndarray, vocab: dict, first_id: int) -> Tuple[np.ndarray, np.ndarray]:
  """Renumbers the codes present in ``codes`` as first_id.. in lexicographic order of their ids.

  Returns ``(dense codes, original ids in dense order)``.
  """
  names = np.empty(len(vocab), dtype=object)
  names[:] = list(vocab)  # dict order == code order
  present = np.unique(codes)
  order = np.argsort(names[present], kind="stable")
  lut = np.full(len(vocab), -1, dtype=np.int64)
  lut[present[order]] = np.arange(first_id, first_id + len(present))
  return lut[codes], names[present[order]]


def read_amazon(reviews_path: str,
                meta_path: Optional[str] = None,
                k_core: int = 5,
                name: Optional[str] = None,
                min_rating: Optional[float] = None) -> SequenceDataset:
  """Reads an Amazon review dump (2014, 2018 or 2023 release) and optionally its metadata.

  Args:
    reviews_path: review file, JSON (or Python-literal) lines, ``.gz`` or plain.
    meta_path: optional metadata file of the same release; gives ``item_text`` with the fields
      ``title``, ``brand`` (2023: ``store``), ``categories``, ``price``, ``description``.  Without
      it ``item_text`` is None.
    k_core: iterated k-core threshold for users and items; 0 or 1 disables it.
    name: dataset name; default from the file name ("reviews_Beauty_5.json.gz" -> "beauty").
    min_rating: if set, reviews rated below it are dropped before the k-core.

  Returns:
    A SequenceDataset: users and items numbered in lexicographic order of their original ids
    (items from 1), each user's items sorted by time (stable: ties keep file order).  Duplicate
    (user, item, time) rows are kept.

  Raises:
    DataFormatError: a malformed line (named ``file:line``) or an empty file.
    ValueError: bad arguments, or no interaction survives the filters.
  """
  if k_core < 0:
    raise ValueError(f"k_core must be >= 0, got {k_core}")
  name = name or _default_name(reviews_path)
  stats: dict = {}
  users, items, times, user_vocab, item_vocab = _read_reviews(reviews_path, min_rating, stats)

  n_before = len(users)  # rows after the min_rating filter
  n_users_before = len(np.unique(users))
  n_items_before = len(np.unique(items))
  kept, iterations = k_core_filter(users, items, k_core)
  users, items, times = users[kept], items[kept], times[kept]
  n_users_after = len(np.unique(users))
  n_items_after = len(np.unique(items))
  stats["k_core"] = int(k_core)
  stats["kcore_rows_dropped"] = int(n_before - len(kept))
  stats["kcore_users_dropped"] = int(n_users_before - n_users_after)
  stats["kcore_items_dropped"] = int(n_items_before - n_items_after)
  stats["kcore_iterations"] = int(iterations)
  logging.info("%s: %d-core dropped %d rows, %d users, %d items in %d passes", name, k_core,
               stats["kcore_rows_dropped"], stats["kcore_users_dropped"],
               stats["kcore_items_dropped"], iterations)
  if len(kept) == 0:
    raise ValueError(f"{name}: no interactions left after min_rating={min_rating} and "
                     f"k_core={k_core} (stats: {stats})")

  dense_u, user_ids = _dense_codes(users, user_vocab, 0)
  dense_i, item_names = _dense_codes(items, item_vocab, 1)
  del user_vocab, item_vocab

  # Chronological within each user; two stable sorts so that equal timestamps keep file order.
  by_time = np.argsort(times, kind="stable")
  order = by_time[np.argsort(dense_u[by_time], kind="stable")]
  seq_items = dense_i[order].astype(np.int32)
  offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
  np.cumsum(np.bincount(dense_u, minlength=len(user_ids)), out=offsets[1:])

  # Duplicate (user, item, time) rows, kept but counted.
  triple = np.lexsort((times, dense_i, dense_u))
  same = ((dense_u[triple][1:] == dense_u[triple][:-1]) &
          (dense_i[triple][1:] == dense_i[triple][:-1]) &
          (times[triple][1:] == times[triple][:-1]))
  stats["duplicate_rows"] = int(same.sum())

  item_ids = np.empty(len(item_names) + 1, dtype=object)
  item_ids[0] = "[PAD]"
  item_ids[1:] = item_names

  item_text = None
  if meta_path is not None:
    found = _read_meta(meta_path, set(item_names.tolist()), stats)
    empty = ("",) * len(TEXT_FIELDS)
    rows = [empty] + [found.get(it, empty) for it in item_names]
    item_text = {field: [row[j] for row in rows] for j, field in enumerate(TEXT_FIELDS)}
    stats["items_without_meta"] = int(len(item_names) - len(found))
    if stats["items_without_meta"]:
      logging.warning("%s: %d of %d items have no metadata (empty text)", name,
                      stats["items_without_meta"], len(item_names))

  stats["users"] = int(len(user_ids))
  stats["items"] = int(len(item_names))
  stats["interactions"] = int(len(seq_items))
  dataset = SequenceDataset(name=name, items=seq_items, offsets=offsets, user_ids=user_ids,
                            item_ids=item_ids, item_text=item_text, stats=stats)
  logging.info("%s (stats: %s)", dataset.summary(), stats)
  return dataset
