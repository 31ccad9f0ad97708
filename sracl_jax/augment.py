"""Intra-user views by semantic item substitution, on device and vectorised over the batch.

Each non-padding item of a sequence is, with probability `prob`, replaced by a uniformly chosen
member of its top-k semantic neighbours (self excluded when the table was built).  This replaces
the reference code's per-token Python loop with two random draws and one gather.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def substitute(rng: jax.Array, inputs: jax.Array, item_neighbours: jax.Array,
               prob: float = 0.2) -> jax.Array:
  """One augmented view.

  Args:
    rng: a PRNG key.
    inputs: [B, L] int item ids, 0 = padding.
    item_neighbours: [V, k] int neighbour ids of every item id (row 0 unused).
    prob: per-item substitution probability.

  Returns:
    [B, L] int32 ids; padding stays 0.
  """
  k = item_neighbours.shape[1]
  pick_rng, which_rng = jax.random.split(rng)
  replace = (inputs > 0) & (jax.random.uniform(pick_rng, inputs.shape) < prob)
  which = jax.random.randint(which_rng, inputs.shape, 0, k)
  candidates = item_neighbours[inputs, which]  # [B, L]
  return jnp.where(replace, candidates, inputs).astype(jnp.int32)
