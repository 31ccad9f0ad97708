"""Losses and ranking for catalogues of millions of items (issue #5).

The plain next-item loss scores every item at once: a [B, V] logits array, plus its gradient, on
every device.  At V = 5M and B = 256 that is 5 GB per copy, which does not fit next to anything
else.  This module gives three ways around it, all on the tied item table [V, D]:

  * `sharded_softmax_cross_entropy`: the exact full-softmax CE.  The table stays sharded over the
    mesh's item ("vocab") axis; each shard scores only its own rows, in blocks of `chunk_size`
    rows, and keeps a running max and sum of exponentials (the "online softmax").  Shards merge
    their log-sum-exps with one pmax and one psum; the target's logit comes from the shard that
    owns the target row.  Peak memory per device is O(B x chunk_size), never O(B x V); a custom
    VJP recomputes each block's logits in the backward pass instead of storing them.
  * `sampled_softmax_loss`: a softmax over the target and `num_negatives` items drawn from a
    proposal Q (e.g. popularity ** power), with the logQ correction so that the loss estimates
    the full CE (exactly so as num_negatives grows).  O(B x num_negatives) per step.
  * `sharded_top_k`: full-ranking top-k (evaluation, serving) as per-shard, per-block top-k and a
    merge; equal to `lax.top_k` of the full scores.
  * `sharded_target_ranks`: the full-ranking rank of each target (the evaluation metrics) as
    per-shard, per-block counts; the evaluator uses it whenever `config.model.softmax` is not
    "full".

`synthetic_powerlaw` builds a Zipf-distributed `SequenceDataset` of any size for benchmarks.

Mesh axes: the functions take a `Partitioner`, a `Mesh`, or nothing (then the mesh and the
logical-axis rules of the surrounding `Partitioner.context()` are used, which is the case inside
the train step).  The item axis is wherever the rules put the logical axis "vocab" (by default the
mesh axis "tensor"), the batch axes wherever they put "batch".  When the item axis has a single
device, everything runs locally as a chunked scan over item blocks.

Item ids: with `n_items` given, rows 1..n_items are items and every other row (the padding row 0
and the filler rows that round the table up to an even split) is masked to -inf, exactly like
`layers.mask_non_items` in the models' `score`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from seqrec_jax import sharding as sharding_lib
from seqrec_jax.data.dataset import SequenceDataset

SOFTMAX_KINDS = ("full", "sharded", "sampled")
# A finite stand-in for -inf as a running maximum: exp(x - _FLOOR) never meets -inf - (-inf).
_FLOOR = -1e30

AxesArg = Union[str, Sequence[str], None]
MeshArg = Union[sharding_lib.Partitioner, jax.sharding.Mesh, jax.sharding.AbstractMesh, None]


@dataclasses.dataclass(frozen=True)
class SoftmaxConfig:
  """How the next-item loss normalises over the catalogue (`config.model.softmax*`).

  Attributes:
    kind: "full" (materialise [B, V] logits; the reference), "sharded" (exact, blocked and
      sharded over the item axis) or "sampled" (sampled softmax with logQ correction).
    num_negatives: sampled only: negatives per step, shared by the whole batch.
    sampling_power: sampled only: the proposal is (train count + 1) ** power; 0 = uniform.
    chunk_size: sharded only: item rows scored at once on each device.
  """
  kind: str = "full"
  num_negatives: int = 1024
  sampling_power: float = 0.75
  chunk_size: int = 65536

  def __post_init__(self):
    if self.kind not in SOFTMAX_KINDS:
      raise ValueError(f"config.model.softmax={self.kind!r}; allowed: {SOFTMAX_KINDS}")
    if self.num_negatives < 1:
      raise ValueError(f"config.model.num_negatives={self.num_negatives} must be positive")
    if self.sampling_power < 0:
      raise ValueError(f"config.model.sampling_power={self.sampling_power} must be >= 0")
    if self.chunk_size < 1:
      raise ValueError(f"config.model.softmax_chunk={self.chunk_size} must be positive")

  @classmethod
  def from_config(cls, model_config: ml_collections.ConfigDict) -> "SoftmaxConfig":
    """Reads `config.model`; configs written before these keys existed get the defaults."""
    default = cls()
    return cls(kind=model_config.get("softmax", default.kind),
               num_negatives=int(model_config.get("num_negatives", default.num_negatives)),
               sampling_power=float(model_config.get("sampling_power", default.sampling_power)),
               chunk_size=int(model_config.get("softmax_chunk", default.chunk_size)))


# ----------------------------------------------------------------------------------------------
# Mesh axes


def _as_tuple(axes: AxesArg) -> Tuple[str, ...]:
  if axes is None:
    return ()
  if isinstance(axes, str):
    return (axes,)
  return tuple(a for a in axes if a is not None)


def _resolve_axes(mesh: MeshArg, vocab_axes: Any, batch_axes: Any):
  """Finds the mesh and the mesh axes of the item and batch dimensions.

  Args:
    mesh: a Partitioner (its mesh and rules), a Mesh, or None for the context mesh.
    vocab_axes: mesh axes of the item dimension, or "auto" for the rules' "vocab".
    batch_axes: mesh axes of the batch dimension, or "auto" for the rules' "batch".

  Returns:
    (mesh or None, vocab axes tuple, batch axes tuple, number of item shards).  Batch axes that
    also shard items are dropped: the batch is then replicated over them.
  """
  rules = None
  if isinstance(mesh, sharding_lib.Partitioner):
    mesh, rules = mesh.mesh, mesh.rules
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return None, (), (), 1
  rules = rules or nn.get_logical_axis_rules() or sharding_lib.DEFAULT_RULES
  if isinstance(vocab_axes, str) and vocab_axes == "auto":
    vocab_axes = nn.logical_to_mesh_axes(("vocab",), rules)[0]
  if isinstance(batch_axes, str) and batch_axes == "auto":
    batch_axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
  vocab_axes, batch_axes = _as_tuple(vocab_axes), _as_tuple(batch_axes)
  for axis in vocab_axes + batch_axes:
    if axis not in mesh.shape:
      raise ValueError(f"mesh axis {axis!r} is not in the mesh {dict(mesh.shape)}")
  batch_axes = tuple(a for a in batch_axes if a not in vocab_axes)
  shards = math.prod(mesh.shape[a] for a in vocab_axes)
  return mesh, vocab_axes, batch_axes, shards


def _spec_axes(axes: Tuple[str, ...]):
  """A PartitionSpec entry: None, one axis name, or a tuple of names."""
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def _vary(x: jax.Array, axes: Tuple[str, ...]) -> jax.Array:
  """Marks `x` as device-varying over `axes` inside shard_map (a no-op where it already is).

  A custom VJP's cotangents must have their primal's type; making the inputs vary over every
  axis up front lets autodiff insert the psums that sum the per-device cotangents of a
  replicated input (the transpose of this cast), instead of the custom rule having to.
  """
  aval = jax.typeof(x)
  # The varying axes: `aval.vma` in older JAX releases, `aval.mat.varying` in newer ones.
  have = getattr(aval, "vma", None)
  if have is None:
    have = getattr(getattr(aval, "mat", None), "varying", frozenset())
  missing = tuple(a for a in axes if a not in have)
  return lax.pcast(x, missing, to="varying") if missing else x


def _batch_shardable(batch: int, mesh, batch_axes: Tuple[str, ...]) -> Tuple[str, ...]:
  """The batch axes if the batch divides evenly over them, else () (replicate the batch)."""
  if batch_axes and batch % math.prod(mesh.shape[a] for a in batch_axes) == 0:
    return batch_axes
  return ()


# ----------------------------------------------------------------------------------------------
# Blocked log-sum-exp over one table shard


def _block_logits(hidden: jax.Array, table: jax.Array, i: jax.Array, first_id: jax.Array,
                  chunk: int, n_items: Optional[int]) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Masked logits of the i-th block of `chunk` rows of a table shard.

  The last block is clamped to end at the shard's last row (so every block has the same static
  shape); its rows that the previous block already covered are masked out.

  Args:
    hidden: [B, D] user vectors.
    table: [Vs, D] this shard's rows.
    i: int32 block index.
    first_id: global item id of the shard's row 0.
    chunk: rows per block (<= Vs).
    n_items: rows 1..n_items are items; None = every row is.

  Returns:
    (logits [B, C] float32 with -inf on masked rows, the block's rows [C, D], first row index).
  """
  v = table.shape[0]
  lo = i * chunk                                      # first row this block is responsible for
  start = jnp.minimum(lo, v - chunk)                  # clamped so the slice stays in bounds
  rows = lax.dynamic_slice_in_dim(table, start, chunk)                            # [C, D]
  # As the models' `attend` + `mask_non_items`: matmul in the compute dtype, then float32.
  logits = jnp.einsum("bd,cd->bc", hidden, rows.astype(hidden.dtype)).astype(jnp.float32)
  local = start + jnp.arange(chunk)                   # [C] row within the shard
  keep = local >= lo                                  # the clamped last block's overlap is done
  if n_items is not None:
    ids = first_id + local                            # [C] global item ids
    keep = keep & (ids >= 1) & (ids <= n_items)
  return jnp.where(keep[None, :], logits, -jnp.inf), rows, start


def _lse_forward(hidden, table, first_id, n_items, chunk):
  """[B] log-sum-exp of the shard's masked logits, one block at a time (online softmax)."""
  n_blocks = -(-table.shape[0] // chunk)

  def stats(m, s, i):
    logits, _, _ = _block_logits(hidden, table, i, first_id, chunk, n_items)     # [B, C]
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))   # finite: m starts at _FLOOR
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
    return m_new, s

  # The carry starts from block 0's statistics rather than from constants, so that it already
  # has the device-varying type the loop body produces inside shard_map.
  m, s = stats(jnp.float32(_FLOOR), jnp.float32(0.0), jnp.int32(0))
  if n_blocks > 1:
    (m, s), _ = lax.scan(lambda c, i: (stats(*c, i), None), (m, s),
                         jnp.arange(1, n_blocks, dtype=jnp.int32))
  # A shard with no item rows (only filler) has s = 0: floor its lse so that merging with the
  # other shards and the backward pass's exp(logits - lse) stay finite.
  return jnp.maximum(m + jnp.log(s), _FLOOR)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _shard_logsumexp(hidden: jax.Array, table: jax.Array, first_id: jax.Array,
                     n_items: Optional[int], chunk: int) -> jax.Array:
  """Log-sum-exp over a table shard's item rows, without a [B, Vs] array in either pass.

  Args:
    hidden: [B, D].
    table: [Vs, D].
    first_id: int32 global id of the shard's first row.
    n_items: rows 1..n_items are items (None = all rows).
    chunk: rows per block.

  Returns:
    [B] float32, floored at -1e30 (a shard holding no item).
  """
  return _lse_forward(hidden, table, first_id, n_items, chunk)


def _shard_logsumexp_fwd(hidden, table, first_id, n_items, chunk):
  lse = _lse_forward(hidden, table, first_id, n_items, chunk)
  # Residuals are the inputs and [B] values: the blocks' logits are recomputed backwards.
  return lse, (hidden, table, first_id, lse)


def _shard_logsumexp_bwd(n_items, chunk, residuals, g):
  """d lse / d logits = softmax(logits); both matmul gradients are accumulated block by block."""
  hidden, table, first_id, lse = residuals
  n_blocks = -(-table.shape[0] // chunk)

  def accumulate(d_hidden, d_table, i):
    logits, rows, start = _block_logits(hidden, table, i, first_id, chunk, n_items)  # [B, C]
    p = (jnp.exp(logits - lse[:, None]) * g[:, None]).astype(hidden.dtype)        # [B, C]
    d_hidden = d_hidden + jnp.einsum("bc,cd->bd", p, rows.astype(hidden.dtype),
                                     preferred_element_type=jnp.float32)          # [B, D]
    d_rows = jnp.einsum("bc,bd->cd", p, hidden,
                        preferred_element_type=jnp.float32)                       # [C, D]
    # Add, not overwrite: the clamped last block overlaps the previous one (with p = 0 there).
    d_table = lax.dynamic_update_slice_in_dim(
        d_table, lax.dynamic_slice_in_dim(d_table, start, chunk) + d_rows.astype(d_table.dtype),
        start, axis=0)
    return d_hidden, d_table

  d_hidden, d_table = accumulate(jnp.zeros(hidden.shape, jnp.float32), jnp.zeros_like(table),
                                 jnp.int32(0))
  if n_blocks > 1:
    (d_hidden, d_table), _ = lax.scan(lambda c, i: (accumulate(*c, i), None),
                                      (d_hidden, d_table),
                                      jnp.arange(1, n_blocks, dtype=jnp.int32))
  return d_hidden.astype(hidden.dtype), d_table, None


_shard_logsumexp.defvjp(_shard_logsumexp_fwd, _shard_logsumexp_bwd)


def _owned_target_logit(hidden: jax.Array, table: jax.Array, targets: jax.Array,
                        first_id: jax.Array) -> jax.Array:
  """[B] logit of each target on the shard that owns its row, 0 on the other shards."""
  local = targets - first_id                                                      # [B]
  owned = (local >= 0) & (local < table.shape[0])
  rows = jnp.take(table, jnp.clip(local, 0, table.shape[0] - 1), axis=0)         # [B, D]
  logit = jnp.einsum("bd,bd->b", hidden, rows.astype(hidden.dtype)).astype(jnp.float32)
  return jnp.where(owned, logit, 0.0)


def _chunk_for(rows: int, chunk_size: Optional[int]) -> int:
  if chunk_size is None:
    return rows
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size} must be positive")
  return min(int(chunk_size), rows)


def sharded_softmax_cross_entropy(hidden: jax.Array, table: jax.Array, targets: jax.Array, *,
                                  n_items: Optional[int] = None, mesh: MeshArg = None,
                                  vocab_axes: AxesArg = "auto", batch_axes: AxesArg = "auto",
                                  chunk_size: Optional[int] = 65536) -> jax.Array:
  """Full-softmax cross-entropy without materialising [B, V] logits.

  Equal (to float rounding) to
  `optax.softmax_cross_entropy_with_integer_labels(mask(hidden @ table.T), targets)`, with the
  same gradients.  The table is sharded over `vocab_axes`; every device scores its V / s rows in
  blocks of `chunk_size`, keeping a running max and sum of exponentials; the shards merge their
  log-sum-exps with a pmax and a psum, and the target logit is taken on the shard owning it.

  Args:
    hidden: [B, D] user vectors (any float dtype; the matmul runs in it, the softmax in float32).
    table: [V, D] item table (V divisible by the number of item shards).
    targets: [B] int item ids (rows of `table`).
    n_items: rows 1..n_items are items and all others are masked to -inf (the models' padding and
      filler rows); None = every row is a class.
    mesh: a Partitioner, a Mesh, or None for the context mesh (inside `Partitioner.context()`).
    vocab_axes: mesh axes sharding the items; "auto" = the rules' logical "vocab" axis.
    batch_axes: mesh axes sharding the batch; "auto" = the rules' logical "batch" axis.
    chunk_size: item rows per block on each device (memory O(B x chunk_size)); None = a shard's
      rows at once.

  Returns:
    [B] float32 cross-entropies.  Rows whose target is a masked row get a finite, meaningless
    value (the full path gives inf); weight them out as the full path does.
  """
  mesh, vocab_axes, batch_axes, shards = _resolve_axes(mesh, vocab_axes, batch_axes)
  v = table.shape[0]
  targets = targets.astype(jnp.int32)
  if shards == 1:
    # One item shard: a local blocked scan (under jit the batch stays as the caller sharded it).
    chunk = _chunk_for(v, chunk_size)
    first = jnp.int32(0)
    lse = _shard_logsumexp(hidden, table, first, n_items, chunk)
    return lse - _owned_target_logit(hidden, table, targets, first)
  if v % shards:
    raise ValueError(f"the item table's {v} rows do not split evenly over the {shards} devices of "
                     f"mesh axes {vocab_axes}; round them up (config.model.vocab_pad_multiple)")
  rows_per_shard = v // shards
  chunk = _chunk_for(rows_per_shard, chunk_size)
  batch_axes = _batch_shardable(hidden.shape[0], mesh, batch_axes)
  all_axes = vocab_axes + batch_axes

  def per_shard(h, tab, t):  # h [b, D], tab [Vs, D], t [b]
    h, tab = _vary(h, all_axes), _vary(tab, all_axes)
    first = lax.axis_index(vocab_axes).astype(jnp.int32) * rows_per_shard
    lse = _shard_logsumexp(h, tab, first, n_items, chunk)                         # [b]
    # log-sum-exp merge across shards; the max only shifts, so it carries no gradient.
    top = lax.pmax(lax.stop_gradient(lse), vocab_axes)                            # [b]
    total = top + jnp.log(lax.psum(jnp.exp(lse - top), vocab_axes))               # [b]
    target_logit = lax.psum(_owned_target_logit(h, tab, t, first), vocab_axes)    # [b]
    return total - target_logit

  b_spec, v_spec = _spec_axes(batch_axes), _spec_axes(vocab_axes)
  fn = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(b_spec, None), P(v_spec, None), P(b_spec)),
                     out_specs=P(b_spec))
  return fn(hidden, table, targets)


# ----------------------------------------------------------------------------------------------
# Sampled softmax


def item_proposal(counts: np.ndarray, power: float, n_rows: int,
                  smoothing: float = 1.0) -> Tuple[np.ndarray, np.ndarray]:
  """The sampling proposal Q(i) proportional to (counts[i] + smoothing) ** power over items.

  Only rows 1..n_items (n_items = len(counts) - 1) can be drawn; the padding row 0 and filler
  rows up to `n_rows` get Q = 0.  The returned log Q is that of the float32 CDF the sampler
  searches (not of the float64 weights), so the logQ correction matches the sampler exactly for
  a continuous uniform draw.

  Args:
    counts: [n_items + 1] interaction counts per item id (row 0 ignored), e.g. training targets.
    power: exponent; 0 = uniform over items, 1 = popularity.
    n_rows: rows of the item table (>= n_items + 1).
    smoothing: added to every count, so that unseen items can still be drawn as negatives.

  Returns:
    (cdf [n_rows] float32 non-decreasing, ending at ~1; log_q [n_rows] float32, -inf where Q = 0).
  """
  counts = np.asarray(counts, dtype=np.float64)
  n_items = len(counts) - 1
  if n_rows < n_items + 1:
    raise ValueError(f"n_rows={n_rows} is smaller than n_items + 1 = {n_items + 1}")
  weights = np.zeros(n_rows, np.float64)                                          # [V]
  weights[1:n_items + 1] = (counts[1:] + smoothing) ** power
  total = weights.sum()
  if not total > 0:
    raise ValueError("the proposal has no mass: every item weight is 0")
  cdf = np.cumsum(weights / total).astype(np.float32)                              # [V]
  # Exact differences of the float32 CDF (items whose mass rounds away get Q = 0: never drawn).
  cdf64 = cdf.astype(np.float64)
  q = np.diff(cdf64, prepend=0.0) / cdf64[-1]
  with np.errstate(divide="ignore"):
    log_q = np.log(q).astype(np.float32)
  return cdf, log_q


def sample_items(rng: jax.Array, sampling_cdf: jax.Array, num: int) -> jax.Array:
  """[num] int32 row ids drawn with replacement from the CDF (inverse-CDF, O(num log V)).

  `searchsorted(side="right")` returns i with cdf[i - 1] <= u < cdf[i], so rows with zero mass
  (flat CDF steps) are never returned.
  """
  u = jax.random.uniform(rng, (num,), jnp.float32) * sampling_cdf[-1]             # [N]
  ids = jnp.searchsorted(sampling_cdf, u, side="right")
  return jnp.minimum(ids, sampling_cdf.shape[0] - 1).astype(jnp.int32)


def sampled_softmax_loss(hidden: jax.Array, table: jax.Array, targets: jax.Array, rng: jax.Array,
                         *, num_negatives: int, item_log_q: jax.Array,
                         sampling_cdf: Optional[jax.Array] = None, correct_log_q: bool = True,
                         remove_accidental_hits: bool = True) -> jax.Array:
  """Sampled softmax with logQ correction: an estimate of the full CE at O(B x N) cost.

  N = num_negatives items are drawn with replacement from Q, shared by the whole batch.  With
  s_j = hidden . table[j], the loss of a row with target t is

    -s_t + log( exp(s_t) + sum_k exp(s_{n_k} - log(N Q(n_k))) ),

  where draws equal to t ("accidental hits") are removed.  Since E[exp(s_n) / (N Q(n)) ; n != t]
  summed over the N draws is sum_{j != t} exp(s_j), the bracket is an unbiased estimate of the
  full partition function, and the loss converges to the full CE as N grows (from below at
  finite N, by Jensen's inequality).  Only negatives are corrected: the target enters exactly,
  as in the full softmax.  Without the correction (`correct_log_q=False`) popular items are
  over-counted and the loss is biased by the proposal.

  Args:
    hidden: [B, D] user vectors.
    table: [V, D] item table.
    targets: [B] int item ids.
    rng: key for the draws.
    num_negatives: N.
    item_log_q: [V] float32 log Q (-inf for rows never drawn), e.g. from `item_proposal`.
    sampling_cdf: [V] float32 CDF of Q (default: the cumulative sum of exp(item_log_q)).
    correct_log_q: subtract log(N Q) from the negatives' logits.
    remove_accidental_hits: mask draws equal to the row's own target.

  Returns:
    [B] float32 losses.
  """
  if sampling_cdf is None:
    sampling_cdf = jnp.cumsum(jnp.exp(item_log_q.astype(jnp.float32)))
  targets = targets.astype(jnp.int32)
  negatives = lax.stop_gradient(sample_items(rng, sampling_cdf, num_negatives))  # [N]
  dtype = hidden.dtype
  target_logit = jnp.einsum("bd,bd->b", hidden,
                            jnp.take(table, targets, axis=0).astype(dtype)).astype(jnp.float32)
  neg_logits = jnp.einsum("bd,nd->bn", hidden,
                          jnp.take(table, negatives, axis=0).astype(dtype)).astype(jnp.float32)
  if correct_log_q:
    neg_logits = neg_logits - (jnp.log(float(num_negatives)) + item_log_q[negatives])[None, :]
  if remove_accidental_hits:
    neg_logits = jnp.where(negatives[None, :] == targets[:, None], -jnp.inf, neg_logits)
  logits = jnp.concatenate([target_logit[:, None], neg_logits], axis=1)           # [B, 1 + N]
  return jax.nn.logsumexp(logits, axis=1) - target_logit


# ----------------------------------------------------------------------------------------------
# Full-ranking top-k


def grouped_top_k(scores: jax.Array, k: int, group: Optional[int] = None,
                  valid: Optional[Tuple[int, int]] = None) -> Tuple[jax.Array, jax.Array]:
  """`lax.top_k(scores, k)` over the last axis, exactly (ties included), in two cheaper passes.

  The items are cut into consecutive groups of `group`; the k groups with the highest maxima
  (lower group first on ties) hold every item of the exact top k, since an item outside them has
  k items, one in each of those groups, that beat it or tie it with a lower id.  Their k x group
  candidates, kept in id order, go through one small `lax.top_k`.  One pass reads the scores
  (the group maxima fuse into it) instead of a top-k over the whole row, which is the slow part
  of `lax.top_k` on CPU at millions of items.  Items past the last whole group are always
  candidates.

  `valid=(lo, hi)` ranks as if every score outside ids [lo, hi) were -inf (the models' padding and
  filler rows) without writing a masked copy of the row: on CPU that copy is a full extra write
  and read of [..., V], which costs as much as the top-k itself.  Only the few groups that cross
  lo or hi have their maxima recomputed masked, and the candidates are masked after the gather.

  Args:
    scores: [..., V] scores (-inf allowed).
    k: list length (<= V).
    group: items per group; None = 64 when the row is long enough to gain (V >= 16 x 64 x k),
      else plain `lax.top_k`.
    valid: optional static (lo, hi): only ids lo <= id < hi can score; the others come out as -inf
      (at the end of the list, in id order, if fewer than k ids are valid).

  Returns:
    (values [..., k], indices [..., k] int32), as `lax.top_k` of the masked scores.
  """
  v = scores.shape[-1]
  lo, hi = (0, v) if valid is None else (max(0, int(valid[0])), min(v, int(valid[1])))
  masked = (lo, hi) != (0, v)

  def mask(x, ids):
    return jnp.where((ids >= lo) & (ids < hi), x, -jnp.inf) if masked else x

  if group is None:
    group = 64 if v >= 16 * 64 * k else 0
  n_groups = v // group if group else 0
  if n_groups <= k:
    vals, idx = lax.top_k(mask(scores, jnp.arange(v)), k)
    return vals, idx.astype(jnp.int32)
  lead = scores.shape[:-1]
  main = n_groups * group
  grouped = scores[..., :main].reshape(*lead, n_groups, group)                     # [..., G, g]
  maxima = jnp.max(grouped, axis=-1)                                               # [..., G]
  if masked:  # recompute, masked, the maxima of the groups that hold an id outside [lo, hi)
    edge = sorted({g for g in range(n_groups) if g * group < lo or (g + 1) * group > hi})
    if edge:
      edge_ids = jnp.asarray(edge, jnp.int32)                                      # [E]
      block = jnp.take(grouped, edge_ids, axis=-2)                                 # [..., E, g]
      block_ids = edge_ids[:, None] * group + jnp.arange(group)                    # [E, g]
      maxima = maxima.at[..., edge_ids].set(jnp.max(mask(block, block_ids), axis=-1))
  _, best = lax.top_k(maxima, k)                                                   # [..., k]
  best = jnp.sort(best, axis=-1)                                   # id order: lax's tie rule
  cand = jnp.take_along_axis(grouped, best[..., None], axis=-2)                    # [..., k, g]
  cand_ids = best[..., None] * group + jnp.arange(group)                           # [..., k, g]
  cand = cand.reshape(*lead, k * group)
  cand_ids = cand_ids.reshape(*lead, k * group)
  if main < v:  # the tail, ids above every group's: appended last, order kept
    cand = jnp.concatenate([cand, scores[..., main:]], axis=-1)
    tail_ids = jnp.broadcast_to(jnp.arange(main, v), (*lead, v - main))
    cand_ids = jnp.concatenate([cand_ids, tail_ids], axis=-1)
  vals, pos = lax.top_k(mask(cand, cand_ids), k)
  return vals, jnp.take_along_axis(cand_ids, pos, axis=-1).astype(jnp.int32)


def _shard_top_k(hidden, table, first_id, n_items, chunk, k):
  """Top-k of one table shard's masked scores, block by block: ([B, k] values, [B, k] global ids).

  Blocks are visited in row order and the running best comes first in every merge, so ties
  resolve to the lower id exactly as `lax.top_k` does on the full row.
  """
  n_blocks = -(-table.shape[0] // chunk)

  def best(i):
    logits, _, start = _block_logits(hidden, table, i, first_id, chunk, n_items)   # [B, C]
    vals, idx = grouped_top_k(logits, k)                                           # [B, k]
    return vals, (first_id + start + idx).astype(jnp.int32)

  def merge(carry, i):
    vals, ids = best(i)
    both_vals = jnp.concatenate([carry[0], vals], axis=1)                          # [B, 2k]
    both_ids = jnp.concatenate([carry[1], ids], axis=1)
    top_vals, pos = lax.top_k(both_vals, k)
    return (top_vals, jnp.take_along_axis(both_ids, pos, axis=1)), None

  carry = best(jnp.int32(0))
  if n_blocks > 1:
    carry, _ = lax.scan(merge, carry, jnp.arange(1, n_blocks, dtype=jnp.int32))
  return carry


def sharded_top_k(hidden: jax.Array, table: jax.Array, k: int, *, n_items: Optional[int] = None,
                  mesh: MeshArg = None, vocab_axes: AxesArg = "auto",
                  batch_axes: AxesArg = "auto",
                  chunk_size: Optional[int] = 65536) -> Tuple[jax.Array, jax.Array]:
  """Full-ranking top-k items of each user, never holding [B, V] scores.

  Each device takes the top k of its table shard (block by block), the k-lists of all shards are
  all-gathered ([B, s x k]) and merged by one more top-k.  Equal to
  `lax.top_k(mask(hidden @ table.T), k)`, ties included (lower id first).

  Args:
    hidden: [B, D] user vectors.
    table: [V, D] item table.
    k: list length (<= n_items; a block is widened to k rows if chunk_size is smaller).
    n_items: rows 1..n_items are items; None = every row.
    mesh: a Partitioner, a Mesh, or None for the context mesh.
    vocab_axes: mesh axes sharding the items ("auto" = the rules' "vocab").
    batch_axes: mesh axes sharding the batch ("auto" = the rules' "batch").
    chunk_size: rows scored at once per device; None = the whole shard.

  Returns:
    (scores [B, k] float32, item ids [B, k] int32), best first.
  """
  mesh, vocab_axes, batch_axes, shards = _resolve_axes(mesh, vocab_axes, batch_axes)
  v = table.shape[0]
  if v % shards:
    raise ValueError(f"the item table's {v} rows do not split evenly over {shards} item shards")
  rows_per_shard = v // shards
  if k > v:
    raise ValueError(f"k={k} exceeds the item table's {v} rows")
  # A shard contributes at most its own rows; blocks must hold at least that many candidates.
  k_shard = min(k, rows_per_shard)
  chunk = max(_chunk_for(rows_per_shard, chunk_size), k_shard)
  if shards == 1:
    return _shard_top_k(hidden, table, jnp.int32(0), n_items, chunk, k)
  batch_axes = _batch_shardable(hidden.shape[0], mesh, batch_axes)

  def per_shard(h, tab):  # h [b, D], tab [Vs, D]
    first = lax.axis_index(vocab_axes).astype(jnp.int32) * rows_per_shard
    vals, ids = _shard_top_k(h, tab, first, n_items, chunk, k_shard)               # [b, k']
    # Gathered in shard order, i.e. in id order: the merge keeps lax.top_k's tie rule.
    vals = lax.all_gather(vals, vocab_axes, axis=1, tiled=True)                    # [b, s k']
    ids = lax.all_gather(ids, vocab_axes, axis=1, tiled=True)
    top_vals, pos = lax.top_k(vals, k)
    return top_vals, jnp.take_along_axis(ids, pos, axis=1)

  b_spec, v_spec = _spec_axes(batch_axes), _spec_axes(vocab_axes)
  # After the all-gather every item shard holds the same merged lists, but all_gather's result
  # is typed as device-varying; nothing here is differentiated, so the check is simply off.
  fn = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(b_spec, None), P(v_spec, None)),
                     out_specs=(P(b_spec, None), P(b_spec, None)), check_vma=False)
  return fn(hidden, table)


# ----------------------------------------------------------------------------------------------
# Full-ranking rank of a target (evaluation)


def _shard_rank_counts(hidden, table, targets, exclude, target_score, first_id, n_items, chunk):
  """[B] number of this shard's items (not the target, not excluded) scoring >= the target."""
  b = hidden.shape[0]
  n_blocks = -(-table.shape[0] // chunk)
  rows_b = jnp.arange(b)[:, None]                                                   # [B, 1]

  def count(total, i):
    logits, _, start = _block_logits(hidden, table, i, first_id, chunk, n_items)   # [B, C]
    ids = first_id + start + jnp.arange(chunk, dtype=jnp.int32)                     # [C]
    better = (logits >= target_score[:, None]) & (ids[None, :] != targets[:, None])
    if exclude is not None:
      local = exclude - (first_id + start)                                           # [B, H]
      local = jnp.where((local >= 0) & (local < chunk), local, chunk)  # chunk: dropped below
      seen = jnp.zeros((b, chunk), bool).at[rows_b, local].set(True, mode="drop")   # [B, C]
      better = better & ~seen
    return total + jnp.sum(better, axis=1, dtype=jnp.int32), None

  total, _ = lax.scan(count, jnp.zeros((b,), jnp.int32), jnp.arange(n_blocks, dtype=jnp.int32))
  return total


def sharded_target_ranks(hidden: jax.Array, table: jax.Array, targets: jax.Array, *,
                         exclude: Optional[jax.Array] = None, n_items: Optional[int] = None,
                         mesh: MeshArg = None, vocab_axes: AxesArg = "auto",
                         batch_axes: AxesArg = "auto",
                         chunk_size: Optional[int] = 65536) -> jax.Array:
  """0-based pessimistic rank of each target among all items, never holding [B, V] scores.

  The blocked, item-sharded form of `metrics.target_ranks(mask(hidden @ table.T), targets,
  exclude)`: the target's score comes from the shard owning its row (one psum), then every shard
  counts, block by block, its items scoring at least as high (the target itself and the `exclude`d
  items left out) and the counts are summed with a second psum.  Peak memory per device is
  O(B x chunk_size).  The target's score is one dot product rather than an entry of a matmul, so
  an item whose score *exactly* equals the target's may round to the other side of it; otherwise
  the ranks are those of `metrics.target_ranks`.

  Args:
    hidden: [B, D] user vectors.
    table: [V, D] item table.
    targets: [B] target item ids.
    exclude: optional [B, H] item ids ranked out (history); entries equal to the target are not.
    n_items: rows 1..n_items are items; None = every row.
    mesh, vocab_axes, batch_axes, chunk_size: as `sharded_top_k`.

  Returns:
    [B] int32 ranks.
  """
  mesh, vocab_axes, batch_axes, shards = _resolve_axes(mesh, vocab_axes, batch_axes)
  v = table.shape[0]
  if v % shards:
    raise ValueError(f"the item table's {v} rows do not split evenly over {shards} item shards")
  rows_per_shard = v // shards
  chunk = _chunk_for(rows_per_shard, chunk_size)
  targets = targets.astype(jnp.int32)
  if exclude is not None:
    exclude = exclude.astype(jnp.int32)
  if shards == 1:
    score = _owned_target_logit(hidden, table, targets, jnp.int32(0))
    return _shard_rank_counts(hidden, table, targets, exclude, score, jnp.int32(0), n_items,
                              chunk)
  batch_axes = _batch_shardable(hidden.shape[0], mesh, batch_axes)

  def per_shard(h, tab, t, *ex):  # h [b, D], tab [Vs, D], t [b], ex ([b, H],)
    first = lax.axis_index(vocab_axes).astype(jnp.int32) * rows_per_shard
    score = lax.psum(_owned_target_logit(h, tab, t, first), vocab_axes)              # [b]
    counts = _shard_rank_counts(h, tab, t, ex[0] if ex else None, score, first, n_items, chunk)
    return lax.psum(counts, vocab_axes)                                              # [b]

  b_spec, v_spec = _spec_axes(batch_axes), _spec_axes(vocab_axes)
  in_specs = (P(b_spec, None), P(v_spec, None), P(b_spec))
  args = (hidden, table, targets)
  if exclude is not None:
    in_specs += (P(b_spec, None),)
    args += (exclude,)
  fn = jax.shard_map(per_shard, mesh=mesh, in_specs=in_specs, out_specs=P(b_spec),
                     check_vma=False)
  return fn(*args)


# ----------------------------------------------------------------------------------------------
# Synthetic data


def synthetic_powerlaw(n_users: int, n_items: int, n_interactions: int, alpha: float = 1.0,
                       seed: int = 0, min_length: int = 3, chunk: int = 1 << 22,
                       name: str = "") -> SequenceDataset:
  """A power-law (Zipf) interaction dataset of any size, built without per-row Python loops.

  Item popularity follows rank ** -alpha; ranks are assigned to item ids by a random
  permutation, so popular items are spread over every shard of an item-sharded table (as in a
  real catalogue, whose ids do not follow popularity).  User activity is skewed too (lognormal
  weights), with at least `min_length` interactions each so every user is evaluated by the
  leave-one-out split.  Items within a sequence are independent draws: this is data for
  measuring speed and memory, not for judging accuracy.

  Memory is O(n_interactions + n_users + n_items): items are drawn `chunk` at a time into the
  final int32 array, and ids are fixed-width strings, not Python objects.

  Args:
    n_users: users.
    n_items: catalogue size (ids 1..n_items; some tail items may never occur).
    n_interactions: total interactions (>= min_length x n_users).
    alpha: Zipf exponent of item popularity (0 = uniform; ~1 is typical of e-commerce).
    seed: random seed.
    min_length: shortest user sequence.
    chunk: interactions drawn per vectorised step (bounds the float64 temporaries).
    name: dataset name (default describes the sizes).

  Returns:
    A SequenceDataset; `stats` records the generator's arguments.
  """
  if n_users < 1 or n_items < 1:
    raise ValueError(f"n_users={n_users} and n_items={n_items} must be positive")
  if n_interactions < min_length * n_users:
    raise ValueError(f"n_interactions={n_interactions} is below min_length x n_users = "
                     f"{min_length * n_users}")
  if alpha < 0:
    raise ValueError(f"alpha={alpha} must be >= 0")
  rng = np.random.default_rng(seed)

  # Sequence lengths: min_length each, the rest spread by skewed per-user activity.
  activity = rng.lognormal(0.0, 1.0, n_users)                                     # [U]
  extra = rng.multinomial(n_interactions - min_length * n_users, activity / activity.sum())
  offsets = np.zeros(n_users + 1, np.int64)                                        # [U + 1]
  np.cumsum(extra + min_length, out=offsets[1:])

  # Items: inverse-CDF sampling of Zipf ranks, then the rank -> id permutation.
  weights = np.arange(1, n_items + 1, dtype=np.float64) ** -alpha                 # [I] by rank
  cdf = np.cumsum(weights)
  cdf /= cdf[-1]
  del weights
  rank_to_id = (rng.permutation(n_items) + 1).astype(np.int32)                    # [I]
  items = np.empty(n_interactions, np.int32)                                       # [N]
  for lo in range(0, n_interactions, chunk):
    hi = min(lo + chunk, n_interactions)
    ranks = np.searchsorted(cdf, rng.random(hi - lo), side="right")               # [n] 0-based
    items[lo:hi] = rank_to_id[np.minimum(ranks, n_items - 1)]

  # Fixed-width strings: ~4 bytes per digit instead of a Python object per id.
  width = max(5, len(str(max(n_users, n_items))))
  user_ids = np.arange(1, n_users + 1).astype(f"<U{width}")
  item_ids = np.empty(n_items + 1, f"<U{width}")
  item_ids[0] = "[PAD]"
  item_ids[1:] = np.arange(1, n_items + 1).astype(f"<U{width}")
  return SequenceDataset(
      name=name or f"powerlaw-{n_users}u-{n_items}i-{n_interactions}x-a{alpha:g}",
      items=items, offsets=offsets, user_ids=user_ids, item_ids=item_ids,
      stats=dict(n_users=n_users, n_items=n_items, n_interactions=n_interactions,
                 alpha=float(alpha), seed=seed))
