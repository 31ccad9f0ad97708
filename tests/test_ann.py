"""seqrec_jax.ann: the exact top-k order both searches share, and the ScaNN builder's checks."""

import numpy as np
import pytest

from seqrec_jax import ann


def _reference(scores, k):
  """Full sort per row: score descending, then column ascending (numpy's stable argsort)."""
  idx = np.stack([np.argsort(-row, kind="stable")[:k] for row in scores])
  return idx, np.take_along_axis(scores, idx, axis=1)


@pytest.mark.parametrize("k", [1, 3, 7, 12])
def test_topk_rows_matches_a_full_sort_with_ties_everywhere(k):
  rng = np.random.default_rng(0)
  # Few distinct values: ties inside the top k and across its boundary in most rows.
  scores = rng.integers(0, 4, size=(200, 12)).astype(np.float32)
  idx, top = ann.topk_rows(scores, k)
  ref_idx, ref_top = _reference(scores, k)
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_array_equal(top, ref_top)


def test_topk_rows_keeps_the_lowest_index_among_ties_at_the_kth_place():
  scores = np.array([[0.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]], np.float32)
  scores = np.repeat(scores, 3, axis=0)[:, ::-1].copy()  # put the ties ahead of the large score
  idx, _ = ann.topk_rows(scores, 3)
  ref_idx, _ = _reference(scores, 3)
  np.testing.assert_array_equal(idx, ref_idx)
  assert idx[0].tolist() == [7, 0, 1]


def test_topk_rows_on_continuous_scores():
  rng = np.random.default_rng(1)
  scores = rng.normal(size=(64, 500)).astype(np.float32)
  idx, top = ann.topk_rows(scores, 10)
  np.testing.assert_array_equal(idx, _reference(scores, 10)[0])
  assert (np.diff(top, axis=1) <= 0).all()


def test_topk_rows_rejects_k_outside_the_row():
  with pytest.raises(ValueError, match=r"k=0 must be in \[1, 5\]"):
    ann.topk_rows(np.zeros((2, 5)), 0)
  with pytest.raises(ValueError, match=r"k=6 must be in \[1, 5\]"):
    ann.topk_rows(np.zeros((2, 5)), 6)


def test_tree_ah_searcher_rejects_an_unknown_init():
  with pytest.raises(ValueError, match="kmeans"):
    ann.tree_ah_searcher(np.zeros((100, 8), np.float32), 5, num_leaves=4,
                         num_leaves_to_search=2, training_sample_size=100, reorder=20,
                         init="kmeans")


def test_tree_ah_searcher_finds_planted_neighbours():
  pytest.importorskip("scann")
  rng = np.random.default_rng(2)
  # 200 well-separated clusters of 10: each row's 10 nearest are its own cluster, itself included.
  centres = rng.normal(size=(200, 32)).astype(np.float32)
  db = np.repeat(centres, 10, axis=0) + 0.05 * rng.normal(size=(2000, 32)).astype(np.float32)
  db /= np.linalg.norm(db, axis=1, keepdims=True)
  searcher = ann.tree_ah_searcher(db, 10, num_leaves=40, num_leaves_to_search=8,
                                  training_sample_size=2000, reorder=100)
  queries = db[::10]  # one row of each cluster
  got, _ = searcher.search_batched(queries)
  exact, _ = ann.topk_rows(queries @ db.T, 10)
  recall = np.mean([len(set(g) & set(e)) / 10 for g, e in zip(np.asarray(got), exact)])
  assert recall > 0.9, recall
