"""Length-bucketed encoding of left-padded sequences: the same outputs for less work.

Sequence encoders here read left-padded windows [N, L] and return one vector per row taken at
the last position. Leading padding columns never change that vector (SASRec and BERT4Rec mask
padding keys and place positions right-aligned; GRU4Rec holds its zero state through padding),
so a row whose items all sit in its last `w` columns gives the same vector from `x[:, L - w:]`.
Training prefixes are short: on the Amazon sets of the SRA-CL paper two thirds of a 20-wide
window is padding, and every column costs the encoder the same.

`bucketed_apply` sorts the rows by the width they need and encodes them in a few static slices,
the shortest rows at the narrowest width. The widths and the number of rows at each come from a
`Plan` built on the host from sampled batches, so every shape is static under `jit`. A batch
that does not fit its plan (more long rows than planned: rare by construction) must be encoded at
full width instead: outputs never depend on whether the plan held, only the dropout draws do, and
the caller can log how often it happened. `bucketed_apply` makes that choice with `lax.cond`;
training steps make it outside the gradient (`fits` + `apply_plan`; see `bucketed_apply`).

Widths needed per row: the span from its first non-padding column to the end, plus the model's
`truncation_slack` (BERT4Rec drops its oldest column to append [MASK], so it needs one padding
column to spare), at most L.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def truncation_slack(model) -> int:
  """Leading padding columns a model consumes before the ones that hold items (0 unless it
  declares `truncation_slack`)."""
  return int(getattr(type(model), "truncation_slack", 0))


def required_widths(inputs: jax.Array, slack: int = 0) -> jax.Array:
  """[N, L] left-padded ids -> [N] int32 narrowest width that keeps every item (+ slack).

  Holes (padding between items) are kept: only the columns before the first item are dropped.
  A row of padding alone needs width 0.
  """
  length = inputs.shape[1]
  real = inputs > 0
  first = jnp.argmax(real, axis=1)
  span = jnp.where(real.any(axis=1), length - first, 0)
  return jnp.where(span > 0, jnp.minimum(span + slack, length), 0).astype(jnp.int32)


def required_widths_np(spans: np.ndarray, max_len: int, slack: int = 0) -> np.ndarray:
  """Host version of `required_widths` from item spans (items per window, <= max_len)."""
  spans = np.asarray(spans, np.int64)
  return np.where(spans > 0, np.minimum(spans + slack, max_len), 0)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static bucket layout for N rows of width L: `sizes[j]` rows at `widths[j]` columns."""
  widths: Tuple[int, ...]
  sizes: Tuple[int, ...]

  def __post_init__(self):
    if len(self.widths) != len(self.sizes) or not self.widths:
      raise ValueError(f"bucket plan needs as many widths as sizes (>= 1), got {self.widths} and "
                       f"{self.sizes}")
    if any(w < 1 for w in self.widths) or list(self.widths) != sorted(set(self.widths)):
      raise ValueError(f"bucket widths must be strictly increasing and >= 1, got {self.widths}")
    if any(n < 0 for n in self.sizes):
      raise ValueError(f"bucket sizes must be >= 0, got {self.sizes}")

  @property
  def rows(self) -> int:
    return int(sum(self.sizes))

  def cost_fraction(self) -> float:
    """Columns encoded over the N x L of a dense pass."""
    return float(sum(w * n for w, n in zip(self.widths, self.sizes))) / (
        max(self.rows, 1) * self.widths[-1])

  def describe(self) -> str:
    parts = ", ".join(f"{n} rows x {w}" for w, n in zip(self.widths, self.sizes) if n)
    return f"{parts} ({100 * self.cost_fraction():.0f}% of the dense columns)"


def make_plan(need_samples: np.ndarray, max_len: int, max_buckets: int,
              n_std: float = 4.0) -> Plan:
  """The cheapest plan of at most `max_buckets` widths that the sampled batches fit.

  Args:
    need_samples: [S, N] widths the rows of S sampled batches need (`required_widths_np`).
    max_len: L, the widest (last) bucket: it takes whatever the narrower ones cannot.
    max_buckets: at most this many widths (each is one more encoder call to trace and run).
    n_std: a width's capacity (rows that need at most it) is the smallest sampled count and at
      most its mean minus n_std standard deviations, so few batches overflow.

  Returns:
    A Plan over N rows whose last width is max_len; columns encoded (sum of rows x width) are
    minimal over all choices of widths.
  """
  need = np.asarray(need_samples)
  if need.ndim != 2 or need.shape[1] < 1:
    raise ValueError(f"need_samples must be [batches, rows], got shape {need.shape}")
  if max_buckets < 1:
    raise ValueError(f"max_buckets must be >= 1, got {max_buckets}")
  if need.max(initial=0) > max_len:
    raise ValueError(f"a sampled row needs width {need.max()} > max_len {max_len}")
  n = need.shape[1]
  widths = np.arange(max_len + 1)
  counts = (need[:, :, None] <= widths[None, None, :]).sum(axis=1)  # [S, L + 1]
  cap = np.minimum(counts.min(axis=0), np.floor(counts.mean(axis=0) - n_std * counts.std(axis=0)))
  cap = np.maximum.accumulate(np.clip(cap, 0, n).astype(np.int64))  # non-decreasing in width
  cap[max_len] = n
  # best[j, w]: fewest columns for the rows up to cap[w] with j buckets, the widest at w.
  inf = np.iinfo(np.int64).max // 4
  best = np.full((max_buckets + 1, max_len + 1), inf, np.int64)
  prev = np.zeros((max_buckets + 1, max_len + 1), np.int64)
  best[0, 0] = 0
  for j in range(1, max_buckets + 1):
    for w in range(1, max_len + 1):
      for v in range(0, w):
        if best[j - 1, v] >= inf:
          continue
        c = best[j - 1, v] + (cap[w] - cap[v]) * w
        if c < best[j, w]:
          best[j, w], prev[j, w] = c, v
  j = int(np.argmin(best[:, max_len]))
  chosen, w = [], max_len
  while j > 0:
    chosen.append(w)
    w = int(prev[j, w])
    j -= 1
  chosen = chosen[::-1]
  sizes, lo = [], 0
  for w in chosen:
    sizes.append(int(cap[w] - lo))
    lo = int(cap[w])
  keep = [(w, s) for w, s in zip(chosen, sizes) if s or w == max_len]
  return Plan(tuple(w for w, _ in keep), tuple(s for _, s in keep))


def fits(need: jax.Array, plan: Plan) -> jax.Array:
  """bool scalar: rows needing these widths ([N], `required_widths`) fit the plan's buckets."""
  if plan.rows != need.shape[0]:
    raise ValueError(f"bucket plan covers {plan.rows} rows, the inputs have {need.shape[0]}")
  ends = np.cumsum(plan.sizes) - 1
  live = [j for j, s in enumerate(plan.sizes) if s]
  sorted_need = jnp.sort(need)
  return jnp.all(sorted_need[ends[live]] <= jnp.asarray([plan.widths[j] for j in live]))


def apply_plan(fn: Callable[[jax.Array, jax.Array], jax.Array], inputs: jax.Array,
               key: jax.Array, plan: Plan, slack: int = 0) -> jax.Array:
  """fn over every row of `inputs` in the plan's buckets, WITHOUT checking that they fit.

  Only for callers that checked `fits` on these rows (or on rows that need at least as much):
  a row wider than its bucket would lose its oldest items. `bucketed_apply` checks for itself.

  Args:
    fn: (x [n, w] int ids, key) -> [n, ...] per-row outputs; must give a row the same output at
      any width that keeps its items (see the module docstring) and treat rows independently.
    inputs: [N, L] left-padded ids, N == plan.rows.
    key: PRNG key; bucket j uses fold_in(key, j).
    plan: the static layout (`make_plan`).
    slack: the model's `truncation_slack`.

  Returns:
    [N, ...] outputs in the rows' own order.
  """
  n, length = inputs.shape
  if plan.rows != n:
    raise ValueError(f"bucket plan covers {plan.rows} rows, the inputs have {n}")
  if plan.widths[-1] > length:
    raise ValueError(f"bucket plan's widest width {plan.widths[-1]} exceeds the inputs' {length}")
  order = jnp.argsort(required_widths(inputs, slack), stable=True)
  xs = inputs[order]
  outs, start = [], 0
  for j, (w, s) in enumerate(zip(plan.widths, plan.sizes)):
    if s:
      outs.append(fn(xs[start:start + s, length - w:], jax.random.fold_in(key, j)))
    start += s
  merged = jnp.concatenate(outs, axis=0)
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n, dtype=order.dtype))
  return merged[inverse]


def bucketed_apply(fn: Callable[[jax.Array, jax.Array], jax.Array], inputs: jax.Array,
                   key: jax.Array, plan: Plan, slack: int = 0) -> Tuple[jax.Array, jax.Array]:
  """`apply_plan` when the rows fit the plan, else fn over the full width (`lax.cond`).

  Differentiating through this `lax.cond` makes each branch also write zeros for the other's
  residuals, which costs about what the buckets save. Under `jax.grad` prefer choosing between
  whole gradient computations outside the differentiated function (`train_state.train_step`'s
  `select_loss`), each using `apply_plan` or the dense pass.

  Returns:
    (outputs [N, ...] in the rows' own order, overflow: bool scalar, True when the rows did not
    fit the plan and were encoded at full width with `key`).
  """
  ok = fits(required_widths(inputs, slack), plan)
  out = jax.lax.cond(ok, lambda x: apply_plan(fn, x, key, plan, slack), lambda x: fn(x, key),
                     inputs)
  return out, jnp.logical_not(ok)


def split_rows(x: jax.Array, sizes: Sequence[int]):
  """[sum(sizes), ...] -> list of consecutive row blocks."""
  return jnp.split(x, np.cumsum(sizes)[:-1].tolist(), axis=0)
