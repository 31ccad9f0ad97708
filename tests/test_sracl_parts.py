"""SRA-CL training parts against independent numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sracl_jax import augment, losses
from sracl_jax.synthesizer import Synthesizer


def _np_nt_xent(z1, z2, w, t):
  z = np.concatenate([z1, z2]).astype(np.float64)
  ww = np.concatenate([w, w])
  n2 = len(z)
  total, count = 0.0, 0.0
  for i in range(n2):
    if ww[i] <= 0:
      continue
    pos = (i + n2 // 2) % n2
    cols = [j for j in range(n2) if j != i and ww[j] > 0]
    logits = np.array([z[i] @ z[j] / t for j in cols])
    lse = np.log(np.sum(np.exp(logits - logits.max()))) + logits.max()
    total += ww[i] * (lse - z[i] @ z[pos] / t)
    count += ww[i]
  return total, count


@pytest.mark.parametrize("t,sim", [(1.0, "dot"), (0.5, "dot"), (0.2, "cos")])
def test_nt_xent_matches_numpy(t, sim):
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
  w = np.array([1, 1, 1, 1, 0, 0], np.float32)  # two padding rows
  got = losses.nt_xent(jnp.asarray(z1), jnp.asarray(z2), jnp.asarray(w), t, sim)
  if sim == "cos":
    z1 = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
    z2 = z2 / np.linalg.norm(z2, axis=1, keepdims=True)
  want = _np_nt_xent(z1, z2, w, t)
  assert float(got[0]) == pytest.approx(want[0], rel=1e-4)
  assert float(got[1]) == want[1] == 8


def test_nt_xent_padding_rows_are_not_negatives():
  """Padding rows repeat real rows; they must not change the loss of the real ones."""
  rng = np.random.default_rng(1)
  z1, z2 = rng.normal(size=(4, 8)), rng.normal(size=(4, 8))
  base = losses.nt_xent(jnp.asarray(z1), jnp.asarray(z2), jnp.ones(4))
  z1p, z2p = np.concatenate([z1, z1[:2]]), np.concatenate([z2, z2[:2]])
  padded = losses.nt_xent(jnp.asarray(z1p), jnp.asarray(z2p), jnp.asarray([1, 1, 1, 1, 0, 0.]))
  assert float(padded[0]) == pytest.approx(float(base[0]), rel=1e-5)


def test_substitute_statistics_and_support():
  rng = np.random.default_rng(2)
  v, k = 30, 5
  table = rng.integers(1, v, size=(v, k)).astype(np.int32)
  inputs = rng.integers(1, v, size=(400, 20)).astype(np.int32)
  inputs[:, :5] = 0
  out = np.asarray(augment.substitute(jax.random.key(0), jnp.asarray(inputs), jnp.asarray(table),
                                      prob=0.2))
  assert np.all(out[:, :5] == 0)  # padding untouched
  changed = out != inputs
  real = inputs > 0
  rate = changed[real].mean()
  assert 0.15 < rate < 0.21  # 0.2 minus the draws that pick an identical neighbour
  rows, cols = np.nonzero(changed)
  for r, c in zip(rows[:200], cols[:200]):
    assert out[r, c] in table[inputs[r, c]]
  # Two draws give two different views.
  out2 = np.asarray(augment.substitute(jax.random.key(1), jnp.asarray(inputs), jnp.asarray(table)))
  assert np.any(out2 != out)


def test_synthesizer_matches_numpy_and_dropout():
  rng = np.random.default_rng(3)
  b, k, s, d = 4, 6, 10, 8
  us, ns, nr = rng.normal(size=(b, s)), rng.normal(size=(b, k, s)), rng.normal(size=(b, k, d))
  mod = Synthesizer(features=d, dropout=0.5)
  params = mod.init(jax.random.key(0), us, ns, nr, train=False)["params"]
  params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                        is_leaf=lambda x: hasattr(x, "unbox"))
  w, a = np.asarray(params["W"], np.float64), np.asarray(params["a"], np.float64)
  # Xavier-uniform limit with gain 1.414.
  assert np.abs(w).max() <= 1.414 * np.sqrt(6 / (s + d)) + 1e-6
  e = np.concatenate([np.repeat((us @ w)[:, None], k, 1), ns @ w], -1) @ a  # [b, k, 1]
  e = np.where(e[..., 0] > 0, e[..., 0], 0.2 * e[..., 0])
  p = np.exp(e - e.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum("bk,bkd->bd", p, nr)
  got = mod.apply({"params": params}, us, ns, nr, train=False)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  dropped = mod.apply({"params": params}, us, ns, nr, train=True,
                      rngs={"dropout": jax.random.key(5)})
  assert not np.allclose(np.asarray(dropped), want)
  # Gradients reach W, a and the neighbour representations.
  g = jax.grad(lambda p_, r_: mod.apply({"params": p_}, us, ns, r_, train=False).sum(),
               argnums=(0, 1))(params, jnp.asarray(nr))
  assert float(jnp.abs(g[0]["W"]).sum()) > 0 and float(jnp.abs(g[1]).sum()) > 0
