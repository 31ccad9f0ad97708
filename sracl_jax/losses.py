"""NT-Xent (normalised-temperature cross-entropy) as SRA-CL's reference uses it.

For N pairs (z1_i, z2_i) the 2N vectors are compared with dot-product similarity divided by the
temperature; each vector's positive is its pair and the other 2(N - 1) vectors are negatives.
Rows with weight 0 (batch padding, which repeats a real row) are excluded both as anchors and as
negatives, so they neither count nor act as false negatives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def nt_xent(z1: jax.Array, z2: jax.Array, weights: jax.Array, temperature: float = 1.0,
            similarity: str = "dot"):
  """Weighted NT-Xent over a batch of positive pairs.

  Args:
    z1: [N, D] first views.
    z2: [N, D] second views (z2_i is z1_i's positive).
    weights: [N] 1 for real rows, 0 for padding rows.
    temperature: similarities are divided by it.
    similarity: "dot" (the reference) or "cos".

  Returns:
    (sum over the 2N anchors of weighted loss, sum of anchor weights).
  """
  if similarity == "cos":
    z1 = z1 / jnp.linalg.norm(z1, axis=-1, keepdims=True).clip(1e-12)
    z2 = z2 / jnp.linalg.norm(z2, axis=-1, keepdims=True).clip(1e-12)
  elif similarity != "dot":
    raise ValueError(f"similarity must be 'dot' or 'cos', got {similarity!r}")
  n = z1.shape[0]
  z = jnp.concatenate([z1, z2], axis=0).astype(jnp.float32)  # [2N, D]
  w = jnp.concatenate([weights, weights], axis=0)  # [2N]
  logits = (z @ z.T) / temperature  # [2N, 2N]
  idx = jnp.arange(2 * n)
  invalid = (idx[:, None] == idx[None, :]) | (w[None, :] <= 0)  # self and padding columns
  logits = jnp.where(invalid, -jnp.inf, logits)
  positive = (idx + n) % (2 * n)
  loss = jax.nn.logsumexp(logits, axis=-1) - logits[idx, positive]  # [2N]
  loss = jnp.where(w > 0, loss, 0.0)
  return jnp.sum(loss * w), jnp.sum(w)
