"""CALRec's text serialisation of purchase histories (Li et al., RecSys 2024, Fig. 2).

A training example is one string made of fixed template pieces and item attribute texts::

  This is the summary of a user's purchase history:
  The first item bought is as follows:
  Title: ...; Brand: ...; Category: ...; Price: ...
  The next item bought is as follows:
  Title: ...; Brand: ...; Category: ...; Price: ...
  The next item bought is as follows:
  <target item's attribute text><eos>

The part up to and including the trailing next-item prefix is the *user part* (the model's input
at inference); the target item's attribute text is what the model learns to generate.  The pieces
are separated by newlines and every piece carries its own separators, so the serialisation is the
plain concatenation ``USER_PREFIX + FIRST_ITEM_PREFIX + text_1 + NEXT_ITEM_PREFIX + text_2 + ...
+ NEXT_ITEM_PREFIX``.  This lets ``examples.TextSerializer`` tokenise every piece and every item
text once and build examples by concatenating token arrays: an item is then tokenised identically
in a history, as a target and alone (for retrieval).

The ordinal prefix follows the position in the *kept* history: when the oldest items are dropped
to fit a token budget, the oldest kept item is "the first item".  An empty history serialises as
``USER_PREFIX + FIRST_ITEM_PREFIX`` (the target is then the first item).

Item attribute texts come from ``SequenceDataset.item_text``, whose field names differ per reader;
``item_attribute_texts`` maps them onto canonical fields (see ``CANONICAL_FIELDS``).
"""

from __future__ import annotations

import dataclasses
import html
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from absl import logging

from seqrec_jax.data.dataset import SequenceDataset

USER_PREFIX = "This is the summary of a user's purchase history:"
FIRST_ITEM_PREFIX = "\nThe first item bought is as follows:\n"
NEXT_ITEM_PREFIX = "\nThe next item bought is as follows:\n"
TEMPLATE_PIECES = (USER_PREFIX, FIRST_ITEM_PREFIX, NEXT_ITEM_PREFIX)

FIELD_SEPARATOR = "; "
DEFAULT_FIELDS = ("title", "brand", "category", "price")
DEFAULT_MAX_VALUE_CHARS = 200
DEFAULT_TEMPLATE_REPEATS = 1000
MISSING_FIELD_MODES = ("skip", "unknown", "error")

# Separators of the category text that readers produce: the Amazon readers write a category path
# as "Beauty > Makeup > Face" and several paths as "path | path".
_CATEGORY_PATH_SEPARATOR = " | "
_CATEGORY_LEVEL_SEPARATOR = ">"


@dataclasses.dataclass(frozen=True)
class CanonicalField:
  """How one canonical attribute is read from the readers' item_text fields.

  Attributes:
    label: the label in the serialised text ("Title").
    sources: reader field names, in order of preference; the first one present is used.
    kind: value formatting: "text" (cleaned as is), "category" (a category path list, see
      ``format_categories``) or "tokens" (a whitespace-separated token list such as RecBole's
      ``token_seq`` ``class`` field, written as a comma-separated list).
  """

  label: str
  sources: Tuple[str, ...]
  kind: str = "text"


# Canonical field -> reader fields.  Reader field names:
#   read_p5 (amazon-*-text):      title, categories
#   amazon.read_amazon:           title, brand (2023: from "store"), categories, price, description
#   read_recbole_atomic ml-100k:  movie_title, release_year, class (space-separated genres)
# ml-100k has no brand, category or price: ask for ("title", "year", "genre") there.
CANONICAL_FIELDS: Dict[str, CanonicalField] = {
    "title": CanonicalField("Title", ("title", "movie_title", "name", "item_name")),
    "brand": CanonicalField("Brand", ("brand", "store")),
    "category": CanonicalField("Category", ("categories", "category", "main_category"),
                               "category"),
    "price": CanonicalField("Price", ("price",)),
    "year": CanonicalField("Year", ("release_year", "year")),
    "genre": CanonicalField("Genre", ("class", "genre", "genres"), "tokens"),
    "description": CanonicalField("Description", ("description",)),
}


def clean_text(value: Optional[str], max_chars: int = DEFAULT_MAX_VALUE_CHARS) -> str:
  """HTML entities unescaped, whitespace collapsed, capped at ``max_chars`` characters.

  Titles in the Amazon dumps carry entities ("&amp;") and stray tabs/newlines; both waste tokens
  and newlines would break the one-item-per-block template.  The cap keeps one item (some Beauty
  titles run to 900 characters) from eating the history's token budget; it cuts at the last
  space before the cap when there is one, so no word is split.

  Args:
    value: the raw value (None -> "").
    max_chars: the cap; <= 0 means no cap.

  Returns:
    The cleaned string.
  """
  if not value:
    return ""
  s = value if isinstance(value, str) else str(value)
  if "&" in s:
    s = html.unescape(s)
  s = " ".join(s.split())
  if 0 < max_chars < len(s):
    cut = s.rfind(" ", 0, max_chars + 1)
    s = s[:cut] if cut > max_chars // 2 else s[:max_chars]
    s = s.rstrip(" ,;:-")
  return s


def format_categories(value: str, drop_root: bool = True) -> str:
  """Category paths as one comma-separated list of distinct levels.

  "Beauty > Skin Care > Body | Beauty > Bath & Body" -> "Skin Care, Body, Bath & Body".  The root
  level ("Beauty", "Toys & Games") is the same for (almost) every item of a catalogue, so it
  carries no information and is dropped (``drop_root``) unless it is all a path has.

  Args:
    value: the reader's category text (paths separated by " | ", levels by " > ").
    drop_root: drop the first level of every path that has more than one level.

  Returns:
    The formatted list ("" for an empty value).
  """
  levels: List[str] = []
  seen = set()
  for path in value.split(_CATEGORY_PATH_SEPARATOR):
    parts = [p.strip() for p in path.split(_CATEGORY_LEVEL_SEPARATOR)]
    parts = [p for p in parts if p]
    if drop_root and len(parts) > 1:
      parts = parts[1:]
    for p in parts:
      if p not in seen:
        seen.add(p)
        levels.append(p)
  return ", ".join(levels)


def _format_tokens(value: str) -> str:
  # RecBole token_seq fields are space-separated; multi-word genres are hyphenated ("Film-Noir").
  return ", ".join(value.split())


def _formatter(kind: str, drop_category_root: bool) -> Callable[[str], str]:
  if kind == "category":
    return lambda v: format_categories(v, drop_category_root)
  if kind == "tokens":
    return _format_tokens
  return lambda v: v


def available_fields(dataset: SequenceDataset) -> Dict[str, str]:
  """Canonical fields the dataset can provide.

  Args:
    dataset: the dataset.

  Returns:
    ``{canonical field: reader field}`` for every canonical field with a source in
    ``dataset.item_text``, in ``CANONICAL_FIELDS`` order.
  """
  present = set(dataset.item_text or {})
  out = {}
  for name, spec in CANONICAL_FIELDS.items():
    for source in spec.sources:
      if source in present:
        out[name] = source
        break
  return out


def item_attribute_texts(dataset: SequenceDataset,
                         fields: Sequence[str] = DEFAULT_FIELDS,
                         unknown: str = "unknown",
                         max_chars: int = DEFAULT_MAX_VALUE_CHARS,
                         missing_fields: str = "skip",
                         drop_category_root: bool = True) -> List[str]:
  """The attribute text "Title: ...; Brand: ...; Category: ...; Price: ..." of every item.

  Args:
    dataset: the dataset; its ``item_text`` must be set.
    fields: canonical fields to write, in order (keys of ``CANONICAL_FIELDS``: title, brand,
      category, price, year, genre, description).
    unknown: written for an item whose value is empty.
    max_chars: cap on each value's length in characters (<= 0: no cap).
    missing_fields: what to do with a requested field the dataset has no column for (e.g.
      brand on the P5 Beauty text set): "skip" it (logged once), write ``unknown`` for every
      item ("unknown"), or raise ("error").
    drop_category_root: drop the root level of category paths (see ``format_categories``).

  Returns:
    ``[n_items + 1]`` list of str aligned with the item ids; index 0 (padding) is "".

  Raises:
    ValueError: the dataset has no item text, a field name is not a canonical field, no
      requested field is available, or a field is missing with ``missing_fields="error"``.
  """
  if missing_fields not in MISSING_FIELD_MODES:
    raise ValueError(
        f"missing_fields must be one of {MISSING_FIELD_MODES}, got {missing_fields!r}")
  if not dataset.item_text:
    raise ValueError(f"{dataset.name}: the dataset has no item text")
  available = available_fields(dataset)
  unknown_names = [f for f in fields if f not in CANONICAL_FIELDS]
  if unknown_names:
    raise ValueError(
        f"unknown item text field(s) {unknown_names}; canonical fields are "
        f"{list(CANONICAL_FIELDS)}; {dataset.name} provides {list(available)} "
        f"(reader fields: {sorted(dataset.item_text)})")
  columns = []  # (label, values or None for all-unknown, formatter)
  for name in fields:
    spec = CANONICAL_FIELDS[name]
    if name in available:
      columns.append((spec.label, dataset.item_text[available[name]],
                      _formatter(spec.kind, drop_category_root)))
    elif missing_fields == "error":
      raise ValueError(
          f"{dataset.name} has no {name!r} field (sources {list(spec.sources)}); it provides "
          f"{list(available)} (reader fields: {sorted(dataset.item_text)})")
    elif missing_fields == "unknown":
      columns.append((spec.label, None, None))
    else:
      logging.warning("%s: no %r item field (it provides %s): left out of the item text",
                      dataset.name, name, list(available))
  if not columns:
    raise ValueError(
        f"none of the fields {list(fields)} is available in {dataset.name}; it provides "
        f"{list(available)}")
  n = len(dataset.item_ids)
  texts = [""] * n
  for i in range(1, n):
    parts = []
    for label, values, fmt in columns:
      value = ""
      if values is not None:
        # Format before capping: formatting changes the length (categories lose their root).
        value = clean_text(fmt(clean_text(values[i], 0)), max_chars)
      parts.append(f"{label}: {value or unknown}")
    texts[i] = FIELD_SEPARATOR.join(parts)
  return texts


def history_text(item_texts: Sequence[str]) -> str:
  """The user part for a history, oldest item first, ending with the next-item prefix.

  This is the reference (string) form of what ``examples.TextSerializer.history_tokens``
  builds from tokens; it keeps every item (no budget).

  Args:
    item_texts: attribute texts of the history items, chronological.

  Returns:
    The serialised user part.
  """
  if not item_texts:
    return USER_PREFIX + FIRST_ITEM_PREFIX
  parts = [USER_PREFIX, FIRST_ITEM_PREFIX, item_texts[0]]
  for text in item_texts[1:]:
    parts += [NEXT_ITEM_PREFIX, text]
  parts.append(NEXT_ITEM_PREFIX)
  return "".join(parts)


def tokenizer_corpus(item_texts: Sequence[str],
                     template_repeats: int = DEFAULT_TEMPLATE_REPEATS) -> List[str]:
  """Texts to train a tokenizer on: every non-empty item text plus the template pieces.

  The template pieces occur once per history item in the real data but only once in a list of
  item texts; repeating them lets BPE / Unigram learn their words as whole tokens (with
  ``min_frequency=2`` a single copy would not even be merged).

  Args:
    item_texts: attribute texts (index 0, the padding row, may be "").
    template_repeats: copies of each template piece.

  Returns:
    The training texts.
  """
  return [t for t in item_texts if t] + list(TEMPLATE_PIECES) * max(int(template_repeats), 1)


def example_text(item_texts: Sequence[str], target_text: str) -> str:
  """User part followed by the target item's text (without the end-of-sequence token).

  Args:
    item_texts: attribute texts of the history items, chronological.
    target_text: attribute text of the next item.

  Returns:
    The serialised training example.
  """
  return history_text(item_texts) + target_text
