"""CALRec's losses: next-item generation (L_NIG) and the two in-batch contrastive alignments.

The paper (arXiv 2405.02429, Sec. 3) combines

    L = (1 - alpha - beta) * L_NIG + alpha * L_TT + beta * L_UT

where L_NIG is the token cross-entropy on the target item's text only, L_TT aligns the target text
encoded after the history (v_T|U) with the same text encoded alone (v_T), and L_UT aligns the
history (v_U) with v_T. Each v is the mean of last-layer states over its tokens.

Our readings of what the paper leaves open (all configurable, documented in calrec_jax/README.md):
  * similarity: cosine divided by a temperature (`similarity="dot"` drops the normalisation);
  * direction: query -> key (v_T|U -> v_T, v_U -> v_T) over the batch's keys; `symmetric=True`
    averages both directions;
  * in-batch false negatives: when two rows of a batch have the same target item, the other row is
    not used as a negative (its key equals the positive);
  * padding rows (weight 0) are neither anchors nor negatives.
"""

from __future__ import annotations

from typing import Dict, Optional

import jax
import jax.numpy as jnp
import optax

NEG_INF = -1e9


def masked_mean(states: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `states` [B, L, D] over positions where `mask` [B, L] is set -> [B, D] float32."""
  mask = mask.astype(jnp.float32)
  total = jnp.einsum("bld,bl->bd", states.astype(jnp.float32), mask)
  return total / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)


def in_batch_info_nce(queries: jax.Array, keys: jax.Array, weights: jax.Array, *,
                      temperature: float, similarity: str = "cosine",
                      item_ids: Optional[jax.Array] = None, symmetric: bool = False) -> jax.Array:
  """InfoNCE with in-batch negatives: row i's positive is key i, negatives the other rows' keys.

  Args:
    queries: [B, D] anchors (e.g. v_T|U or v_U).
    keys: [B, D] positives/negatives (v_T).
    weights: [B] row weights; 0 marks padding rows.
    temperature: divides the similarities.
    similarity: "cosine" or "dot".
    item_ids: [B] optional target item ids; rows sharing the positive's item are not negatives.
    symmetric: also the key -> query direction, averaged.

  Returns:
    Scalar: the weighted mean loss over real rows.
  """
  q = queries.astype(jnp.float32)
  k = keys.astype(jnp.float32)
  if similarity == "cosine":
    q = q * jax.lax.rsqrt(jnp.sum(q * q, axis=-1, keepdims=True) + 1e-12)
    k = k * jax.lax.rsqrt(jnp.sum(k * k, axis=-1, keepdims=True) + 1e-12)
  elif similarity != "dot":
    raise ValueError(f"similarity must be 'cosine' or 'dot', got {similarity!r}")
  logits = (q @ k.T) / temperature  # [B, B]
  b = logits.shape[0]
  eye = jnp.eye(b, dtype=bool)
  valid_col = weights > 0  # padding rows are no one's negatives
  allowed = valid_col[None, :] | eye
  if item_ids is not None:
    allowed &= (item_ids[:, None] != item_ids[None, :]) | eye
  logits = jnp.where(allowed, logits, NEG_INF)
  labels = jnp.arange(b)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)  # [B]
  if symmetric:
    loss_t = optax.softmax_cross_entropy_with_integer_labels(
        jnp.where(allowed, (k @ q.T) / temperature, NEG_INF), labels)  # same negative set
    loss = 0.5 * (loss + loss_t)
  w = weights.astype(jnp.float32)
  return jnp.sum(jnp.where(w > 0, loss, 0.0) * w) / jnp.maximum(jnp.sum(w), 1e-9)


def generation_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                    z_loss: float = 0.0) -> Dict[str, jax.Array]:
  """Token cross-entropy over the masked positions (the target item's text and its eos).

  Args:
    logits: [B, T, V] float32.
    labels: [B, T] next tokens.
    mask: [B, T] float weights (0 off the target text).
    z_loss: weight of the PaLM auxiliary log(Z)^2 term (0 = off).

  Returns:
    {"nig": mean CE per target token, "z": mean log(Z)^2, "tokens": number of target tokens}.
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
  label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  ce = log_z - label_logit
  mask = mask.astype(jnp.float32)
  tokens = jnp.sum(mask)
  denom = jnp.maximum(tokens, 1.0)
  nig = jnp.sum(jnp.where(mask > 0, ce, 0.0) * mask) / denom
  z = jnp.sum(jnp.where(mask > 0, log_z ** 2, 0.0) * mask) / denom
  return {"nig": nig, "z": z * z_loss, "tokens": tokens}


def combine(nig: jax.Array, tt: jax.Array, ut: jax.Array, alpha: float, beta: float) -> jax.Array:
  """(1 - alpha - beta) L_NIG + alpha L_TT + beta L_UT (beta may be negative: see README)."""
  return (1.0 - alpha - beta) * nig + alpha * tt + beta * ut
