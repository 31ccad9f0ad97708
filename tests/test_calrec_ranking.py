"""CALRec retrieval and merging: BM25 against a pure-Python BM25, hand-worked merges, metrics."""

import math
import os
import re

import numpy as np
import pytest

from calrec_jax import ranking
from calrec_jax.bm25 import BM25Index

# Item 0 is padding: its text matches the test queries strongly, so a leak of id 0 would show.
# Items 6 and 7 are identical, so their scores tie exactly (tie-break: smaller id first).
# Item 9 has no text and item 10 only stopwords: neither can ever be retrieved.
CORPUS = [
    "red running shoes red running shoes",
    "red running shoes for men",
    "blue running shoes",
    "trail running shoes with red laces and a waterproof upper",
    "red lipstick matte",
    "the red book of recipes",
    "waterproof hiking boots",
    "waterproof hiking boots",
    "running socks, pack of 6",
    "",
    "the and of a",
    "lipstick",
]
STOP = ["the", "and", "of", "a", "for", "with"]
QUERIES = [
    "red running shoes",
    "waterproof boots",
    "lipstick lipstick red",  # a repeated query word counts twice, as in bm25s
    "RED Book",               # lowercasing
    "shoes socks laces upper matte recipes",
]


def _ref_tokens(text):
  """Independent tokeniser: lowercase, words of 2+ word characters, minus STOP."""
  return [w for w in re.findall(r"(?u)\b\w\w+\b", text.lower()) if w not in STOP]


def _ref_scores(corpus, query, k1, b, method):
  """Plain-Python BM25 of `query` against items 1.. (item 0 is padding and not indexed).

  Formulas (Kamphuis et al. 2020, as bm25s names them), N documents, avgdl the mean length:
    idf  lucene: log(1 + (N - df + .5) / (df + .5));  robertson: log(max(1, (N - df + .5) /
         (df + .5)));  atire: log(N / df)
    tf   lucene/robertson: tf / (k1 (1 - b + b dl / avgdl) + tf);
         atire: tf (k1 + 1) / (tf + k1 (1 - b + b dl / avgdl))
  summed over query token occurrences.
  """
  docs = [_ref_tokens(t) for t in corpus[1:]]
  n = len(docs)
  avgdl = sum(len(d) for d in docs) / n
  out = [0.0] * len(corpus)
  for t in _ref_tokens(query):
    df = sum(1 for d in docs if t in d)
    if df == 0:
      continue
    if method == "lucene":
      idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    elif method == "robertson":
      idf = math.log(max(1.0, (n - df + 0.5) / (df + 0.5)))
    else:
      idf = math.log(n / df)
    for i, d in enumerate(docs, start=1):
      tf = d.count(t)
      if tf == 0:
        continue
      norm = k1 * (1 - b + b * len(d) / avgdl)
      out[i] += idf * (tf * (k1 + 1) / (tf + norm) if method == "atire" else tf / (norm + tf))
  return np.asarray(out)


@pytest.fixture(scope="module")
def index():
  return BM25Index(CORPUS, k1=1.2, b=0.75, method="lucene", stopwords=STOP)


# ------------------------------------------------------------------------------------- BM25


@pytest.mark.parametrize("method,k1,b", [("lucene", 1.2, 0.75), ("robertson", 1.5, 0.5),
                                         ("atire", 0.9, 0.4)])
def test_bm25_matches_reference(method, k1, b):
  idx = BM25Index(CORPUS, k1=k1, b=b, method=method, stopwords=STOP)
  top_r = 6
  ids, scores = idx.query(QUERIES, top_r=top_r)
  assert ids.shape == scores.shape == (len(QUERIES), top_r)
  assert ids.dtype == np.int64 and scores.dtype == np.float32
  for q, text in enumerate(QUERIES):
    ref = _ref_scores(CORPUS, text, k1, b, method)
    np.testing.assert_allclose(idx.scores_all(text), ref, rtol=1e-5, atol=1e-5)
    # Expected ranking: positive scores only, score descending, ties by the smaller item id.
    hits = [i for i in np.lexsort((np.arange(len(ref)), -ref)) if ref[i] > 0][:top_r]
    assert hits, text  # every test query has hits
    np.testing.assert_array_equal(ids[q, :len(hits)], hits)
    np.testing.assert_allclose(scores[q, :len(hits)], ref[hits], rtol=1e-5, atol=1e-5)
    assert np.all(ids[q, len(hits):] == 0) and np.all(scores[q, len(hits):] == 0)


def test_exact_tie_goes_to_smaller_id(index):
  ids, scores = index.query(["waterproof hiking boots"], top_r=2)
  np.testing.assert_array_equal(ids[0], [6, 7])  # identical texts
  assert scores[0, 0] == scores[0, 1] > 0


def test_padding_never_returned(index):
  # Item 0's text is the best match for this query, and top_r exceeds the number of items.
  ids, scores = index.query(["red running shoes"] * 3, top_r=len(CORPUS) + 5)
  n_hits = int(np.sum(_ref_scores(CORPUS, "red running shoes", 1.2, 0.75, "lucene") > 0))
  assert n_hits > 0
  for row_ids, row_scores in zip(ids, scores):
    assert np.all(row_ids[:n_hits] > 0) and np.all(row_scores[:n_hits] > 0)
    assert np.all(row_ids[n_hits:] == 0) and np.all(row_scores[n_hits:] == 0)
  assert 9 not in ids and 10 not in ids  # empty and stopword-only items


@pytest.mark.parametrize("text", ["", None, "   ", "the and of", "zzzz qqqq", "!!! ?? ...", "x"])
def test_empty_or_garbage_query_has_no_hits(index, text):
  ids, scores = index.query([text, "lipstick"], top_r=4)
  assert np.all(ids[0] == 0) and np.all(scores[0] == 0)
  assert ids[1, 0] in (4, 11)  # the other query in the batch is unaffected


def test_query_batching_and_no_queries(index):
  texts = QUERIES * 7
  a = index.query(texts, top_r=5, chunk_size=3, show_progress=False)
  b = index.query(texts, top_r=5)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  ids, scores = index.query([], top_r=5)
  assert ids.shape == (0, 5) and scores.shape == (0, 5)


def test_default_english_stopwords():
  idx = BM25Index(CORPUS)  # stopwords="english", lucene, k1=1.5, b=0.75
  assert np.all(idx.query(["the of and"], top_r=3)[0] == 0)
  assert idx.params == {"k1": 1.5, "b": 0.75, "method": "lucene"}


def test_save_load_round_trip(index, tmp_path):
  index.save(str(tmp_path))
  assert not [f for f in os.listdir(tmp_path) if f.endswith((".pkl", ".pickle"))]
  loaded = BM25Index.load(str(tmp_path))
  assert loaded.params == index.params and loaded.num_items == index.num_items
  for a, b in zip(index.query(QUERIES + ["", "the"], top_r=5),
                  loaded.query(QUERIES + ["", "the"], top_r=5)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(FileNotFoundError):
    BM25Index.load(str(tmp_path / "missing"))


def test_optional_stemmer_saved_as_a_flag(tmp_path):
  def stem(words):  # toy stemmer: plural "s" off; PyStemmer is optional
    return [w[:-1] if w.endswith("s") and len(w) > 3 else w for w in words]

  idx = BM25Index(CORPUS, stopwords=STOP, stemmer=stem)
  ids, _ = idx.query(["shoe"], top_r=3)
  assert ids[0, 0] > 0  # "shoe" matches "shoes" only through the stemmer
  assert np.all(BM25Index(CORPUS, stopwords=STOP).query(["shoe"], top_r=3)[0] == 0)
  idx.save(str(tmp_path))
  with pytest.raises(ValueError, match="stemmer"):
    BM25Index.load(str(tmp_path))
  np.testing.assert_array_equal(BM25Index.load(str(tmp_path), stemmer=stem).query(["shoe"], 3)[0],
                                ids)


def test_bad_construction():
  with pytest.raises(ValueError, match="method"):
    BM25Index(CORPUS, method="bm25+")
  with pytest.raises(ValueError, match="padding"):
    BM25Index(["padding only"])
  with pytest.raises(ValueError, match="no item text"):
    BM25Index(["pad", "", "the of"], stopwords="english")


# ---------------------------------------------------------------------------------- merging


def _naive_merge(ids, scores, rule, epsilon):
  """Per-user Python reference of the three documented rules."""
  n, r = ids.shape
  first, lists, best = {}, {}, {}
  for rank in range(r):
    for lst in range(n):
      item = int(ids[lst, rank])
      if item <= 0:
        continue
      if item not in first:
        first[item], lists[item], best[item] = rank * n + lst, set(), -np.inf
      lists[item].add(lst)
      best[item] = max(best[item], float(scores[lst, rank]))
  if rule == "round_robin":
    key = lambda i: first[i]
  elif rule == "quasi_round_robin":
    key = lambda i: (round(first[i] // n + 1 - epsilon * (len(lists[i]) - 1), 9), first[i])
  else:
    key = lambda i: (-best[i], first[i])
  return sorted(first, key=key)


RR_IDS = np.array([[5, 3, 7],
                   [3, 9, 0],
                   [8, 5, 2]])


def test_round_robin_hand_case():
  # Rank 1: 5, 3, 8; rank 2: 3 (dup), 9, 5 (dup); rank 3: 7, 0 (padding), 2.
  np.testing.assert_array_equal(ranking.round_robin(RR_IDS), [5, 3, 8, 9, 7, 2])
  assert ranking.round_robin(np.zeros((2, 3), np.int64)).size == 0


def test_quasi_round_robin_epsilon_zero_is_round_robin():
  np.testing.assert_array_equal(ranking.quasi_round_robin(RR_IDS, epsilon=0.0),
                                ranking.round_robin(RR_IDS))
  rng = np.random.default_rng(1)
  ids = rng.integers(0, 30, size=(64, 8, 10))
  np.testing.assert_array_equal(ranking.merge_batch(ids, rule="quasi_round_robin", top_k=80),
                                ranking.merge_batch(ids, rule="round_robin", top_k=80))


def test_quasi_round_robin_promotes_consensus():
  # Item 4 is rank 2 in all three lists (effective round 2 - 2 eps); items 1, 2, 3 are rank 1
  # in one list each (effective round 1).
  ids = np.array([[1, 4, 6],
                  [2, 4, 7],
                  [3, 4, 8]])
  rr = [1, 2, 3, 4, 6, 7, 8]
  np.testing.assert_array_equal(ranking.quasi_round_robin(ids, epsilon=0.4), rr)
  # eps = 0.5: a tie on round 1, broken by round-robin order (item 4 is read after 1, 2, 3).
  np.testing.assert_array_equal(ranking.quasi_round_robin(ids, epsilon=0.5), rr)
  # A large eps moves the 3-list item above every single-list rank-1 item.
  np.testing.assert_array_equal(ranking.quasi_round_robin(ids, epsilon=1.0), [4, 1, 2, 3, 6, 7, 8])


def test_quasi_round_robin_fractional_rounds():
  # Item 9 is rank 3 in both lists: effective round 3 - eps.
  ids = np.array([[1, 2, 9],
                  [3, 4, 9]])
  np.testing.assert_array_equal(ranking.quasi_round_robin(ids, epsilon=1.0), [1, 3, 2, 4, 9])
  np.testing.assert_array_equal(ranking.quasi_round_robin(ids, epsilon=1.5), [1, 3, 9, 2, 4])
  np.testing.assert_array_equal(ranking.quasi_round_robin(ids, epsilon=2.5), [9, 1, 3, 2, 4])


def test_max_score_hand_case():
  ids = np.array([[1, 2, 3],
                  [2, 4, 0]])
  scores = np.array([[5.0, 4.0, 2.0],
                     [9.0, 2.0, 0.0]])
  # Best scores: 2 -> 9, 1 -> 5, 4 -> 2, 3 -> 2; the 4/3 tie goes to round-robin order (4 is
  # read at rank 2, 3 only at rank 3).
  np.testing.assert_array_equal(ranking.max_score(ids, scores), [2, 1, 4, 3])


def test_merge_batch_padding_truncation_and_rules():
  ids = np.stack([RR_IDS, np.zeros_like(RR_IDS), np.array([[4, 0, 0], [4, 0, 0], [0, 0, 0]])])
  out = ranking.merge_batch(ids, rule="round_robin", top_k=8)
  assert out.shape == (3, 8) and out.dtype == np.int64
  np.testing.assert_array_equal(out[0], [5, 3, 8, 9, 7, 2, 0, 0])
  np.testing.assert_array_equal(out[1], np.zeros(8))
  np.testing.assert_array_equal(out[2], [4] + [0] * 7)
  np.testing.assert_array_equal(ranking.merge_batch(ids, rule="round_robin", top_k=2)[0], [5, 3])
  with pytest.raises(ValueError, match="scores"):
    ranking.merge_batch(ids, rule="max_score")
  with pytest.raises(ValueError, match="rule"):
    ranking.merge_batch(ids, rule="borda")
  with pytest.raises(ValueError, match="epsilon"):
    ranking.merge_batch(ids, epsilon=-1.0)


@pytest.mark.parametrize("rule", ranking.RULES)
@pytest.mark.parametrize("epsilon", [0.0, 0.3, 1.0, 6.0])
def test_merge_batch_matches_python_reference(rule, epsilon):
  # Small item range: many repeats across lists and some inside one list (counted once).
  rng = np.random.default_rng(7)
  ids = rng.integers(1, 40, size=(50, 6, 12))
  ids[rng.random(ids.shape) < 0.15] = 0
  scores = rng.integers(0, 8, size=ids.shape).astype(np.float32)  # integer scores: many ties
  top_k = 30
  out = ranking.merge_batch(ids, scores, rule=rule, epsilon=epsilon, top_k=top_k, chunk_size=16)
  for u in range(ids.shape[0]):
    ref = _naive_merge(ids[u], scores[u], rule, epsilon)[:top_k]
    np.testing.assert_array_equal(out[u, :len(ref)], ref)
    assert np.all(out[u, len(ref):] == 0)


# ---------------------------------------------------------------------------------- metrics


def test_recall_ndcg_hand_cases():
  ranked = np.zeros((4, 10), np.int64)
  ranked[0, :3] = [7, 3, 9]      # target 7 at rank 1
  ranked[1, :4] = [3, 7, 9, 2]   # target 9 at rank 3
  ranked[2, :4] = [1, 2, 4, 5]   # target 8 missing
  # row 3: empty ranking (nothing retrieved), target 4 missing; its padding zeros never match
  targets = np.array([7, 9, 8, 4])
  sums = ranking.recall_ndcg(ranked, targets, ks=(1, 5, 10))
  assert sums["count"] == 4
  assert sums["Recall@1"] == 1 and sums["Recall@5"] == 2 and sums["Recall@10"] == 2
  assert sums["NDCG@1"] == 1
  assert sums["NDCG@10"] == pytest.approx(1 + 1 / math.log2(4))
  per_row = [ranking.recall_ndcg(ranked[i:i + 1], targets[i:i + 1])["NDCG@10"] for i in range(4)]
  assert per_row == pytest.approx([1.0, 1 / math.log2(4), 0.0, 0.0])

  means = ranking.normalise(ranking.accumulate(ranking.accumulate(None, sums), sums))
  assert list(means) == ranking.metric_keys()
  assert means["Recall@5"] == pytest.approx(0.5)
  assert means["NDCG@5"] == pytest.approx((1 + 1 / math.log2(4)) / 4)


def test_recall_ndcg_weights_and_validation():
  ranked = np.array([[5, 6], [6, 5]])
  sums = ranking.recall_ndcg(ranked, np.array([6, 0]), ks=(1, 2), weights=np.array([1.0, 0.0]))
  assert sums == {"Recall@1": 0.0, "Recall@2": 1.0, "NDCG@1": 0.0,
                  "NDCG@2": pytest.approx(1 / math.log2(3)), "count": 1.0}
  with pytest.raises(ValueError, match="padding"):
    ranking.recall_ndcg(ranked, np.array([6, 0]), ks=(1,))
  with pytest.raises(ValueError, match="K=2"):
    ranking.recall_ndcg(ranked, np.array([6, 5]), ks=(1, 5))
  with pytest.raises(ValueError, match="count"):
    ranking.normalise({"count": 0.0}, ks=(1,))
