"""SRA-CL's learnable sample synthesizer (inter-user contrastive positive).

For a user prefix u with frozen semantic vector s_u and k retrieved neighbour prefixes with
semantic vectors s_n and backbone representations h_n:

  e_n = LeakyReLU_0.2(a^T [W s_u || W s_n]),  p = softmax_n(e),  h+ = sum_n p_n h_n

with dropout on p during training (inverted: survivors scaled by 1 / keep).  Gradients flow into
W, a and through h_n into the backbone.  W is [d_sem, d] and a is [2d, 1], both Xavier-uniform with
gain 1.414, as the reference code initialises them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqrec_jax.models.layers import Dropout


def xavier_uniform(gain: float):
  """Glorot-uniform scaled by `gain` (limit = gain * sqrt(6 / (fan_in + fan_out)))."""
  return nn.initializers.variance_scaling(gain ** 2, "fan_avg", "uniform")


class Synthesizer(nn.Module):
  """Attention over retrieved neighbours, scored from frozen semantic vectors.

  Attributes:
    features: projection width d (the backbone's hidden size in the reference).
    dropout: dropout rate on the k attention weights (0.5 in the reference).
    gain: Xavier gain of W and a.
  """
  features: int
  dropout: float = 0.5
  gain: float = 1.414

  @nn.compact
  def __call__(self, user_sem: jax.Array, neighbour_sem: jax.Array, neighbour_repr: jax.Array,
               *, train: bool) -> jax.Array:
    """Mixes neighbour representations into one positive.

    Args:
      user_sem: [B, S] frozen semantic vectors of the prefixes.
      neighbour_sem: [B, k, S] frozen semantic vectors of their neighbours.
      neighbour_repr: [B, k, D] backbone representations of the neighbours.
      train: dropout on the attention weights.

    Returns:
      [B, D] synthesized positives.
    """
    s = user_sem.shape[-1]
    w = self.param("W", nn.with_logical_partitioning(xavier_uniform(self.gain), (None, "embed")),
                   (s, self.features), jnp.float32)
    a = self.param("a", nn.with_logical_partitioning(xavier_uniform(self.gain), ("embed", None)),
                   (2 * self.features, 1), jnp.float32)
    pu = user_sem @ w  # [B, d]
    pn = neighbour_sem @ w  # [B, k, d]
    # a^T [pu || pn] = a_u . pu + a_n . pn
    e_user = pu @ a[:self.features]  # [B, 1]
    e_neighbour = (pn @ a[self.features:])[..., 0]  # [B, k]
    e = e_user + e_neighbour  # [B, k]
    p = jax.nn.softmax(nn.leaky_relu(e, 0.2), axis=-1)
    p = Dropout(self.dropout)(p, deterministic=not train)
    return jnp.einsum("bk,bkd->bd", p, neighbour_repr)
