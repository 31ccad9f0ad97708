"""CALRec losses against plain-numpy references."""

import numpy as np
import pytest

from calrec_jax import losses


def _np_info_nce(q, k, w, temperature, similarity, ids=None, symmetric=False):
  if similarity == "cosine":
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)

  def one_way(a, b):
    out = []
    for i in range(len(a)):
      if w[i] <= 0:
        out.append(0.0)
        continue
      cols = [j for j in range(len(b))
              if j == i or (w[j] > 0 and (ids is None or ids[j] != ids[i]))]
      logits = np.array([a[i] @ b[j] for j in cols]) / temperature
      m = logits.max()
      lse = m + np.log(np.exp(logits - m).sum())
      out.append(lse - (a[i] @ b[i]) / temperature)
    return np.array(out)

  loss = one_way(q, k)
  if symmetric:
    loss = 0.5 * (loss + one_way(k, q))
  return float((loss * w).sum() / w.sum())


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("use_ids", [False, True])
def test_info_nce_matches_numpy(similarity, symmetric, use_ids):
  rng = np.random.default_rng(0)
  q = rng.normal(size=(6, 5)).astype(np.float32)
  k = rng.normal(size=(6, 5)).astype(np.float32)
  w = np.array([1, 1, 0, 1, 2, 1], np.float32)  # row 2 is padding
  ids = np.array([3, 4, 5, 3, 7, 8]) if use_ids else None  # rows 0 and 3 share a target
  got = float(losses.in_batch_info_nce(q, k, w, temperature=0.3, similarity=similarity,
                                       item_ids=ids, symmetric=symmetric))
  want = _np_info_nce(q, k, w, 0.3, similarity, ids, symmetric)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_info_nce_is_low_when_aligned_and_high_when_not():
  rng = np.random.default_rng(1)
  k = rng.normal(size=(8, 16)).astype(np.float32)
  w = np.ones(8, np.float32)
  aligned = float(losses.in_batch_info_nce(k, k, w, temperature=0.05))
  shuffled = float(losses.in_batch_info_nce(k[::-1], k, w, temperature=0.05))
  assert aligned < 0.1 < shuffled


def test_generation_loss_and_pooling_match_numpy():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 4, 7)).astype(np.float32)
  labels = rng.integers(0, 7, size=(2, 4))
  mask = np.array([[0, 1, 1, 0], [0, 0, 1, 1]], np.float32)
  got = losses.generation_loss(logits, labels, mask, z_loss=1e-2)
  lse = np.log(np.exp(logits).sum(-1))
  ce = lse - np.take_along_axis(logits, labels[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(got["nig"]), (ce * mask).sum() / mask.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(got["z"]), 1e-2 * (lse ** 2 * mask).sum() / mask.sum(),
                             rtol=1e-5)
  assert float(got["tokens"]) == 4.0
  states = rng.normal(size=(2, 4, 3)).astype(np.float32)
  pooled = np.asarray(losses.masked_mean(states, mask))
  np.testing.assert_allclose(pooled[0], states[0, 1:3].mean(0), rtol=1e-6)
  np.testing.assert_allclose(pooled[1], states[1, 2:4].mean(0), rtol=1e-6)


def test_combine_weights():
  assert float(losses.combine(2.0, 3.0, 5.0, 0.125, -0.025)) == pytest.approx(
      0.9 * 2.0 + 0.125 * 3.0 - 0.025 * 5.0)
