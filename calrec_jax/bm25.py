"""BM25 retrieval over the item catalogue, used to ground CALRec's generated item texts.

CALRec's language model writes the *text* of the next item; a BM25 query of that text against
every item's text turns it into a ranked list of item ids.  This module wraps the `bm25s` library
(tokenisation, the eager sparse score matrix, per-query scoring, save/load) behind an item-id API:

- Item ids follow the rest of the library: id 0 is padding.  Only items 1..V-1 are indexed, so id
  0 is never retrieved and is free to mean "no hit" in the [Q, top_r] outputs.
- A "hit" is an item with a strictly positive score, i.e. one that shares at least one weighted
  token with the query.  Items that share nothing are not padded in as arbitrary score-0 results,
  so an empty, all-stopword or out-of-vocabulary query returns no hits (ids 0, scores 0).
- The top-r selection is our own and deterministic: score descending, ties by the smaller item
  id, including ties at the cut-off.  (bm25s's own `retrieve` breaks ties by an unstable sort,
  and with JAX installed it routes every query's top-k through an eager JAX call.)

Tokenisation is bm25s's: lowercase (optional), the scikit-learn pattern `\\b\\w\\w+\\b` (words of 2+
characters), optional stopword removal, optional stemming.  Stemming is off unless a stemmer
callable is passed, so PyStemmer stays an optional dependency.

Only the BM25 variants whose score is a sum over *shared* tokens are supported ("robertson",
"lucene", "atire").  BM25L / BM25+ add a non-occurrence term to every document, which makes every
item a positive-score hit and breaks the "score > 0 means retrieved" rule above.

`bm25s` is imported lazily: importing it runs a tiny `jax.lax.top_k` at import time, which
initialises the JAX backend (and on a GPU host, its memory pre-allocation).  Deferring the import
to the first index build/load keeps `import calrec_jax.bm25` free of that side effect.
"""

from __future__ import annotations

import json
import os
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from seqrec_jax.fileio import atomic_write

SUPPORTED_METHODS = ("robertson", "lucene", "atire")
_CONFIG_NAME = "calrec_bm25.json"
_FORMAT_VERSION = 1

Stopwords = Union[None, str, Sequence[str]]
Stemmer = Optional[Callable[[List[str]], List[str]]]


def _import_bm25s():
  """Imports bm25s on first use (see the module docstring for why not at import time)."""
  import bm25s  # pylint: disable=g-import-not-at-top
  return bm25s


def _progress(total: int, show: Optional[bool], desc: str):
  """A tqdm bar, or a no-op stand-in, for `total` queries.

  Args:
    total: number of queries.
    show: True/False forces the bar on/off; None shows it for large batches only (>= 10k
      queries), where a run takes long enough for progress to matter.
    desc: bar label.

  Returns:
    An object with `update(n)` and `close()`.
  """
  if show is None:
    show = total >= 10_000
  if not show:
    class _Null:
      def update(self, n):
        del n

      def close(self):
        pass
    return _Null()
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=desc, unit="query", dynamic_ncols=True)


class BM25Index:
  """BM25 index over item texts, queried with free text and returning item ids.

  Example:
    index = BM25Index(item_texts)               # item_texts[0] is the padding row
    ids, scores = index.query(["red running shoes"], top_r=50)
    index.save("/tmp/bm25"); index = BM25Index.load("/tmp/bm25")
  """

  def __init__(self, item_texts: Sequence[Optional[str]], *, k1: float = 1.5, b: float = 0.75,
               method: str = "lucene", stopwords: Stopwords = "english", lower: bool = True,
               stemmer: Stemmer = None, show_progress: bool = False):
    """Builds the index.

    Args:
      item_texts: text of each item, indexed by item id; entry 0 (padding) is ignored.  None or ""
        makes an item unretrievable (it can never score > 0).
      k1: BM25 term-frequency saturation.
      b: BM25 length normalisation.
      method: bm25s scoring variant, one of SUPPORTED_METHODS; its idf formula goes with it.
      stopwords: "english" (bm25s's NLTK list), None for none, or an explicit list of words.
      lower: lowercase before tokenising.
      stemmer: optional callable mapping a list of tokens to their stems (or a PyStemmer
        `Stemmer` object).  It is not saved: pass the same one again to `load`.
      show_progress: bm25s's own tokenise/index progress bars.
    """
    if method not in SUPPORTED_METHODS:
      raise ValueError(f"method must be one of {SUPPORTED_METHODS} (got {method!r}); BM25L/BM25+ "
                       "give every item a positive score, see the module docstring")
    if len(item_texts) < 2:
      raise ValueError("item_texts needs the padding row 0 and at least one item")
    bm25s = _import_bm25s()
    self._stopwords = stopwords
    self._lower = lower
    self._stemmer = stemmer
    self.num_items = len(item_texts)
    docs = ["" if t is None else str(t) for t in item_texts[1:]]
    tokens = self._tokenize(docs, show_progress)
    if not any(tokens):
      raise ValueError("no item text has any token left after tokenisation; nothing to index")
    self._retriever = bm25s.BM25(k1=k1, b=b, method=method)
    self._retriever.index(tokens, show_progress=show_progress)

  # -- tokenisation --------------------------------------------------------------------------

  def _tokenize(self, texts: List[str], show_progress: bool = False) -> List[List[str]]:
    """bm25s tokenisation to strings (not ids), so that query and corpus share one vocabulary.

    Args:
      texts: raw strings.
      show_progress: bm25s's progress bar.

    Returns:
      One token list per text (possibly empty).
    """
    bm25s = _import_bm25s()
    stop = self._stopwords
    if stop is not None and not isinstance(stop, str):
      stop = list(stop)
    return bm25s.tokenize(texts, lower=self._lower, stopwords=stop, stemmer=self._stemmer,
                          return_ids=False, show_progress=show_progress)

  # -- properties ----------------------------------------------------------------------------

  @property
  def params(self) -> dict:
    """The scoring parameters (k1, b, method)."""
    r = self._retriever
    return {"k1": float(r.k1), "b": float(r.b), "method": r.method}

  @property
  def vocab_size(self) -> int:
    """Number of distinct indexed tokens."""
    return len(self._retriever.scores["indptr"]) - 1

  # -- querying ------------------------------------------------------------------------------

  def _token_ids(self, tokens: List[str]) -> np.ndarray:
    """Maps query tokens to index columns, dropping out-of-vocabulary ones.

    Repeated query tokens are kept: bm25s sums one contribution per query token occurrence, so
    a word the model wrote twice weighs twice.
    """
    vocab = self._retriever.vocab_dict
    n_cols = self.vocab_size
    # vocab_dict also holds bm25s's "" placeholder (id == n_cols), which has no matrix column.
    ids = [vocab[t] for t in tokens if t in vocab]
    return np.asarray([i for i in ids if i < n_cols], dtype=np.int64)

  def _top_r(self, scores: np.ndarray, r: int) -> Tuple[np.ndarray, np.ndarray]:
    """Deterministic top-r of one query's document scores (positive scores only).

    Args:
      scores: [D] float32 scores of documents 0..D-1 (item id = document + 1).
      r: how many to keep (<= D).

    Returns:
      (documents, scores), each of length <= r, score descending, ties by smaller document.
    """
    d = scores.shape[0]
    kth = np.partition(scores, d - r)[d - r] if r < d else 0.0  # the r-th largest value
    # Every item at or above the r-th largest score, so all ties at the cut-off are in.
    cand = np.flatnonzero(scores >= kth) if kth > 0 else np.flatnonzero(scores > 0)
    # lexsort: last key is primary.  Candidates include every tie at the cut-off, so sorting
    # them by (score desc, doc asc) and truncating makes the boundary deterministic too.
    order = np.lexsort((cand, -scores[cand]))[:r]
    cand = cand[order]
    return cand, scores[cand]

  def query(self, texts: Sequence[Optional[str]], top_r: int, *,
            show_progress: Optional[bool] = None,
            chunk_size: int = 4096) -> Tuple[np.ndarray, np.ndarray]:
    """Retrieves the top_r items for each query text.

    Queries are tokenised in chunks of `chunk_size` (bounding the memory of token lists for
    10^6-query batches) and scored one by one with bm25s's sparse index: the per-query cost is
    O(sum of the posting-list lengths of its tokens + number of items).

    Args:
      texts: Q query strings (None or "" allowed: no hits).
      top_r: results per query.
      show_progress: tqdm bar over queries; None shows it when Q >= 10k.
      chunk_size: queries tokenised per bm25s call.

    Returns:
      (item_ids [Q, top_r] int64, scores [Q, top_r] float32), best first.  Rows with fewer than
      top_r hits are padded with id 0 and score 0.
    """
    if top_r < 1:
      raise ValueError(f"top_r must be >= 1 (got {top_r})")
    q = len(texts)
    out_ids = np.zeros((q, top_r), dtype=np.int64)
    out_scores = np.zeros((q, top_r), dtype=np.float32)
    n_docs = self.num_items - 1
    r_eff = min(top_r, n_docs)
    bar = _progress(q, show_progress, "BM25 query")
    try:
      for start in range(0, q, chunk_size):
        chunk = ["" if t is None else str(t) for t in texts[start:start + chunk_size]]
        for j, toks in enumerate(self._tokenize(chunk)):
          tok_ids = self._token_ids(toks)
          if tok_ids.size == 0:
            continue  # empty / stopword-only / out-of-vocabulary query: no hits
          doc_scores = np.asarray(self._retriever.get_scores_from_ids(tok_ids), dtype=np.float32)
          docs, sc = self._top_r(doc_scores, r_eff)
          out_ids[start + j, :docs.size] = docs + 1  # document d is item d + 1
          out_scores[start + j, :docs.size] = sc
        bar.update(len(chunk))
    finally:
      bar.close()
    return out_ids, out_scores

  def scores_all(self, text: str) -> np.ndarray:
    """Scores of every item for one query (debugging and tests).

    Args:
      text: query string.

    Returns:
      [num_items] float32, entry 0 (padding) is 0.
    """
    out = np.zeros(self.num_items, dtype=np.float32)
    tok_ids = self._token_ids(self._tokenize(["" if text is None else str(text)])[0])
    if tok_ids.size:
      out[1:] = self._retriever.get_scores_from_ids(tok_ids)
    return out

  # -- persistence ---------------------------------------------------------------------------

  def save(self, directory: str) -> None:
    """Writes the index to `directory` (bm25s's .npy/.json files plus our JSON config).

    Nothing is pickled.  Our config is written last and atomically, so a directory holding it
    holds a complete index.

    Args:
      directory: destination folder (created if missing).
    """
    bm25s = _import_bm25s()
    os.makedirs(directory, exist_ok=True)
    self._retriever.save(directory, allow_pickle=False, show_progress=False)
    stop = self._stopwords
    config = {
        "format_version": _FORMAT_VERSION,
        "num_items": self.num_items,
        "lower": self._lower,
        "stopwords": stop if stop is None or isinstance(stop, str) else list(stop),
        "stemmed": self._stemmer is not None,
        "bm25s_version": bm25s.__version__,
        **self.params,
    }
    atomic_write(os.path.join(directory, _CONFIG_NAME),
                 lambda f: json.dump(config, f, indent=2), mode="w")

  @classmethod
  def load(cls, directory: str, stemmer: Stemmer = None, mmap: bool = False) -> "BM25Index":
    """Reads an index written by `save`.

    Args:
      directory: folder given to `save`.
      stemmer: the stemmer the index was built with (required iff it was built with one).
      mmap: memory-map the score arrays instead of reading them into memory.

    Returns:
      The index.
    """
    bm25s = _import_bm25s()
    path = os.path.join(directory, _CONFIG_NAME)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} missing: not a (complete) BM25Index directory")
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
    if config.get("format_version") != _FORMAT_VERSION:
      raise ValueError(f"unsupported BM25Index format {config.get('format_version')}")
    if config["stemmed"] and stemmer is None:
      raise ValueError("this index was built with a stemmer: pass the same one to load()")
    if not config["stemmed"] and stemmer is not None:
      raise ValueError("this index was built without a stemmer; queries would not match")
    self = cls.__new__(cls)
    self._stopwords = config["stopwords"]
    self._lower = config["lower"]
    self._stemmer = stemmer
    self.num_items = int(config["num_items"])
    self._retriever = bm25s.BM25.load(directory, allow_pickle=False, mmap=mmap,
                                      load_corpus=False, show_progress=False)
    return self
