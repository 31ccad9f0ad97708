"""Item-id batches -> token batches for CALRec, with static shapes for jit.

``TextSerializer`` tokenises every item's attribute text and every template piece once.  A batch
is then described by a matrix of *segments* (one row per example: bos, user prefix, ordinal
prefix and item text for each history slot, trailing prefix, target text, eos) with per-segment
lengths; dropping an item or truncating a text only changes a length.  One vectorised gather turns
the segment matrix into a flat token stream and one scatter places it into the ``[B, T]`` batch,
so there is no Python loop over rows or tokens.

Segment kinds are tracked alongside the tokens to derive the masks the CALRec losses need:
the next-item-generation loss on the target text (and its eos), the pooled user vector over the
history, and the pooled target vector over the target text.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import numpy as np

from calrec_jax.text import templates
from calrec_jax.text.tokenizer import TextTokenizer

# Token kinds inside a packed batch.
KIND_PAD = 0
KIND_BOS = 1
KIND_HISTORY = 2   # user prefix, ordinal prefixes, history item texts, trailing prefix
KIND_TARGET = 3    # the target item's text
KIND_EOS = 4       # the eos closing the target text

# The template pieces, repeated as often as ``templates.tokenizer_corpus`` does: appended to the
# item texts they make a tokenizer training corpus in which the template's words are frequent.
TEMPLATE_TEXTS = templates.TEMPLATE_PIECES * templates.DEFAULT_TEMPLATE_REPEATS

_STAT_KEYS = ("histories", "items_seen", "items_kept", "items_dropped", "items_truncated",
              "targets", "targets_truncated")


def _reverse_cumsum(x: np.ndarray) -> np.ndarray:
  """Cumulative sum from the right along the last axis."""
  return np.cumsum(x[..., ::-1], axis=-1)[..., ::-1]


class TextSerializer:
  """Pre-tokenised item texts and template pieces; builds token sequences from item ids.

  Attributes:
    tokenizer: the TextTokenizer.
    add_bos: whether every sequence starts with the bos token (pretrained decoders expect it).
    item_lengths: [n_items + 1] int64 token count of every item text (0 for the padding id).
  """

  def __init__(self, tokenizer: TextTokenizer, item_texts: Sequence[str], add_bos: bool = True):
    """Tokenises every item text and template piece once.

    Args:
      tokenizer: the tokenizer.
      item_texts: ``[n_items + 1]`` attribute texts aligned with the item ids (index 0 is the
        padding id and is always empty), e.g. from ``templates.item_attribute_texts``.
      add_bos: start every sequence with the bos token.
    """
    self.tokenizer = tokenizer
    self.add_bos = bool(add_bos)
    items = tokenizer.encode_batch(list(item_texts))
    items[0] = np.zeros(0, np.int32)  # the padding id never contributes text
    pieces = tokenizer.encode_batch(list(templates.TEMPLATE_PIECES))
    bos = np.asarray([tokenizer.bos_id] if add_bos else [], np.int32)
    eos = np.asarray([tokenizer.eos_id], np.int32)
    self.n_items = len(items) - 1
    # Segment ids: 0..n_items are the items, then the fixed pieces.
    self._bos, self._prefix, self._first, self._next, self._eos = (
        self.n_items + 1 + k for k in range(5))
    segments = items + [bos] + pieces + [eos]
    self._seg_len = np.fromiter(map(len, segments), np.int64, len(segments))    # [S]
    self._seg_start = np.zeros(len(segments), np.int64)                         # [S]
    np.cumsum(self._seg_len[:-1], out=self._seg_start[1:])
    self._flat = np.concatenate(segments).astype(np.int32)                      # [sum S]
    self.item_lengths = self._seg_len[:self.n_items + 1]
    lens = self._seg_len
    # Tokens of the user part that do not depend on the items: bos + prefix + the "first"
    # ordinal (of the oldest kept item, or trailing when the history is empty).  Every kept
    # item then adds its text and one "next" prefix (its successor's or the trailing one).
    self._fixed = int(lens[self._bos] + lens[self._prefix] + lens[self._first])
    self._per_item = int(lens[self._next])
    self.reset_stats()

  @property
  def min_history_tokens(self) -> int:
    """Smallest history budget: fixed pieces, one item token and the trailing prefix."""
    return self._fixed + self._per_item + 1

  @property
  def stats(self) -> Dict[str, int]:
    """Counters since the last ``reset_stats``: histories built, history items seen / kept /
    dropped (oldest first, to fit the budget) / truncated (a single newest item cut to fit),
    targets built / truncated (to max_item_tokens - 1)."""
    return dict(self._stats)

  def reset_stats(self) -> None:
    self._stats = {k: 0 for k in _STAT_KEYS}

  # ----------------------------------------------------------------------------------------------
  # Segment matrices.
  # ----------------------------------------------------------------------------------------------

  def user_segments(self, histories: np.ndarray, budgets: np.ndarray,
                     active: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segments of the user part of every row, oldest items dropped to fit ``budgets``.

    Keeping the newest k items costs ``fixed + k * len(next) + sum of their text lengths``;
    the largest k within the budget is kept.  When not even the newest item fits, it is kept
    truncated from the end to the tokens left (a history always shows at least one item).

    Args:
      histories: [B, H] item ids, chronological, 0 = padding (anywhere, usually on the left).
      budgets: [B] int64 token budget of each row's user part.
      active: [B] bool; inactive rows get no tokens at all.

    Returns:
      (segment ids, lengths, kinds), each [B, 3 + 2H]: bos, prefix, (ordinal, item) per slot,
      trailing prefix.
    """
    histories = np.asarray(histories, np.int64)
    if histories.ndim != 2:
      raise ValueError(f"histories must be [B, H], got shape {histories.shape}")
    if histories.size and (histories.min() < 0 or histories.max() > self.n_items):
      raise ValueError(f"item ids must lie in 0..{self.n_items}")
    if np.any(budgets[active] < self.min_history_tokens):
      raise ValueError(
          f"history budget {int(budgets[active].min())} is below the minimum "
          f"{self.min_history_tokens} tokens (template pieces + one item token)")
    b, h = histories.shape
    valid = (histories > 0) & active[:, None]                         # [B, H]
    cost = np.where(valid, self._seg_len[histories], 0)               # [B, H] item text tokens
    rank = _reverse_cumsum(valid.astype(np.int64))                    # [B, H] 1 = newest item
    total = self._fixed + self._per_item * rank + _reverse_cumsum(cost)  # [B, H] keep rank<=r
    keep = valid & (total <= budgets[:, None])                        # [B, H] a suffix
    n_valid = valid.sum(1)                                            # [B]
    n_keep = keep.sum(1)                                              # [B]
    truncate = (n_keep == 0) & (n_valid > 0)                          # [B]
    newest = valid & (rank == 1)                                      # [B, H]
    cut = truncate[:, None] & newest                                  # [B, H]
    keep |= cut
    n_keep = keep.sum(1)                                              # [B]
    room = budgets - self._fixed - self._per_item                     # [B] >= 1
    item_len = np.where(cut, np.minimum(cost, room[:, None]), np.where(keep, cost, 0))
    ordinal = np.where(rank == n_keep[:, None], self._first, self._next)  # [B, H]
    ordinal_len = np.where(keep, self._seg_len[ordinal], 0)           # [B, H]
    trail = np.where(n_keep > 0, self._next, self._first)             # [B]

    seg = np.empty((b, 3 + 2 * h), np.int64)
    seg[:, 0], seg[:, 1] = self._bos, self._prefix
    seg[:, 2:-1:2], seg[:, 3:-1:2] = ordinal, histories
    seg[:, -1] = trail
    lens = np.empty_like(seg)
    lens[:, 0] = self._seg_len[self._bos]
    lens[:, 1] = self._seg_len[self._prefix]
    lens[:, 2:-1:2], lens[:, 3:-1:2] = ordinal_len, item_len
    lens[:, -1] = self._seg_len[trail]
    lens *= active[:, None]
    kinds = np.full(seg.shape, KIND_HISTORY, np.int8)
    kinds[:, 0] = KIND_BOS

    st = self._stats
    st["histories"] += int(active.sum())
    st["items_seen"] += int(n_valid.sum())
    st["items_kept"] += int(n_keep.sum())
    st["items_dropped"] += int((n_valid - n_keep).sum())
    st["items_truncated"] += int(truncate.sum())
    return seg, lens, kinds

  def target_segments(self, targets: np.ndarray, max_item_tokens: int, active: np.ndarray
                       ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segments of the generated part: the target text cut to ``max_item_tokens - 1`` tokens,
    then eos.

    Args:
      targets: [B] item ids; id 0 gives an empty row.
      max_item_tokens: the text + eos budget (>= 2).
      active: [B] bool; inactive rows get no tokens.

    Returns:
      (segment ids, lengths, kinds), each [B, 2].
    """
    if max_item_tokens < 2:
      raise ValueError(f"max_item_tokens must be >= 2 (text + eos), got {max_item_tokens}")
    targets = np.asarray(targets, np.int64).reshape(-1)
    if targets.size and (targets.min() < 0 or targets.max() > self.n_items):
      raise ValueError(f"item ids must lie in 0..{self.n_items}")
    active = active & (targets > 0)
    full = self._seg_len[targets]                                     # [B]
    seg = np.stack([targets, np.full_like(targets, self._eos)], axis=1)  # [B, 2]
    lens = np.stack([np.minimum(full, max_item_tokens - 1), np.ones_like(full)], axis=1)
    lens *= active[:, None]
    kinds = np.broadcast_to(np.asarray([KIND_TARGET, KIND_EOS], np.int8), seg.shape)
    self._stats["targets"] += int(active.sum())
    self._stats["targets_truncated"] += int((active & (full > max_item_tokens - 1)).sum())
    return seg, lens, kinds

  def pack(self, seg: np.ndarray, lens: np.ndarray, kinds: np.ndarray, length: int,
           left_pad: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Concatenates each row's segments into a padded [B, length] token matrix.

    Args:
      seg: [B, S] segment ids (item ids, or the template piece ids of this serializer).
      lens: [B, S] tokens to take from the start of each segment (<= its length).
      kinds: [B, S] kind of each segment's tokens.
      length: the padded length T; every row must fit.
      left_pad: pad on the left (generation prompts) instead of the right.

    Returns:
      (tokens [B, T] int32 padded with pad_id, kinds [B, T] int8 with KIND_PAD on padding).
    """
    b = seg.shape[0]
    row_len = lens.sum(1)                                             # [B]
    if b and row_len.max() > length:
      raise ValueError(f"a row needs {int(row_len.max())} tokens, more than {length}")
    flat_len = lens.reshape(-1)                                       # [B*S]
    total = int(flat_len.sum())
    seg_offset = np.cumsum(flat_len) - flat_len                       # [B*S] exclusive
    pos = np.arange(total, dtype=np.int64)                            # [N]
    src = np.repeat(self._seg_start[seg.reshape(-1)] - seg_offset, flat_len) + pos  # [N]
    row = np.repeat(np.arange(b), row_len)                            # [N]
    row_offset = np.cumsum(row_len) - row_len                         # [B] exclusive
    col = pos - row_offset[row]                                       # [N]
    if left_pad:
      col += (length - row_len)[row]
    tokens = np.full((b, length), self.tokenizer.pad_id, np.int32)
    tokens[row, col] = self._flat[src]
    kind_out = np.zeros((b, length), np.int8)
    kind_out[row, col] = np.repeat(np.asarray(kinds).reshape(-1), flat_len)
    return tokens, kind_out

  # ----------------------------------------------------------------------------------------------
  # Single sequences.
  # ----------------------------------------------------------------------------------------------

  def history_tokens(self, history_item_ids: Sequence[int], budget: int) -> np.ndarray:
    """Tokens of the user part (bos, prefix, ordinal + item per item, trailing next prefix).

    The OLDEST items are dropped until the rest fits ``budget`` tokens, and the oldest kept
    item is introduced as "the first item".  If not even the newest item fits, it is kept with
    its text truncated from the end (losing e.g. the price before the title).

    Args:
      history_item_ids: chronological item ids; 0 entries (padding) are ignored.
      budget: maximum number of tokens (>= ``min_history_tokens``).

    Returns:
      [n] int32 token ids, n <= budget.
    """
    ids = np.asarray(history_item_ids, np.int64).reshape(1, -1)
    seg, lens, kinds = self.user_segments(ids, np.asarray([budget], np.int64),
                                           np.ones(1, bool))
    n = int(lens.sum())
    return self.pack(seg, lens, kinds, n)[0][0]

  def item_tokens(self, item_id: int) -> np.ndarray:
    """The full pre-tokenised attribute text of one item (no eos)."""
    s, n = self._seg_start[item_id], self._seg_len[item_id]
    return self._flat[s:s + n]

  def piece_tokens(self, piece: str) -> np.ndarray:
    """Tokens of a template piece: "bos", "prefix", "first", "next" or "eos"."""
    seg = {"bos": self._bos, "prefix": self._prefix, "first": self._first, "next": self._next,
           "eos": self._eos}[piece]
    return self._flat[self._seg_start[seg]:self._seg_start[seg] + self._seg_len[seg]]


def build_train_batch(serializer: TextSerializer, inputs: np.ndarray, targets: np.ndarray,
                      weights: np.ndarray, max_tokens: int,
                      max_item_tokens: int) -> Dict[str, np.ndarray]:
  """Token batch for CALRec training from an item-id batch (e.g. a ``TrainIterator`` batch).

  Each row is ``user part + target text + eos``, right-padded to ``max_tokens``.  The target
  text is cut to ``max_item_tokens - 1`` tokens; the user part gets the remaining
  ``max_tokens - len(target text + eos)`` tokens (oldest history items dropped first).

  Args:
    serializer: the TextSerializer.
    inputs: [B, H] left-padded history item ids (0 = padding).
    targets: [B] next item ids.
    weights: [B] example weights; rows with weight 0 come out as pure padding.
    max_tokens: T, the fixed sequence length.
    max_item_tokens: Ti, the fixed length of the target-only sequence.

  Returns:
    A dict of numpy arrays:
      tokens: [B, T] int32, right-padded with pad_id.
      labels: [B, T] int32, ``tokens`` shifted left by one (the next token), pad at the end.
      nig_mask: [B, T] float32, 1 where the NEXT token is a target text token or its eos (the
        next-item-generation loss), times ``weights``.
      user_mask: [B, T] float32, 1 on the user part (without bos): pools v_U.
      target_mask: [B, T] float32, 1 on the target text (without eos): pools v_T|U.
      item_tokens: [B, Ti] int32, the target text + eos alone, right-padded.
      item_mask: [B, Ti] float32, 1 on its text tokens (without eos), so v_T pools exactly the
        tokens ``target_mask`` selects in context.
      weights: [B] float32, passed through.

  Raises:
    ValueError: ``max_tokens - max_item_tokens`` leaves less than
      ``serializer.min_history_tokens`` for the history, or bad ids / shapes.
  """
  inputs = np.asarray(inputs)
  weights = np.asarray(weights, np.float32).reshape(-1)
  if max_tokens - max_item_tokens < serializer.min_history_tokens:
    raise ValueError(
        f"max_tokens={max_tokens} - max_item_tokens={max_item_tokens} leaves less than the "
        f"{serializer.min_history_tokens} tokens a history needs")
  if inputs.ndim != 2 or len(inputs) != len(weights) or len(np.ravel(targets)) != len(weights):
    raise ValueError(f"inconsistent shapes: inputs {inputs.shape}, targets "
                     f"{np.shape(targets)}, weights {weights.shape}")
  active = weights > 0                                                # [B]
  t_seg, t_len, t_kind = serializer.target_segments(targets, max_item_tokens, active)
  budgets = (max_tokens - t_len.sum(1)).astype(np.int64)              # [B]
  u_seg, u_len, u_kind = serializer.user_segments(inputs, budgets, active)
  tokens, kinds = serializer.pack(
      np.concatenate([u_seg, t_seg], 1), np.concatenate([u_len, t_len], 1),
      np.concatenate([u_kind, t_kind], 1), max_tokens)                # [B, T], [B, T]
  pad = serializer.tokenizer.pad_id
  labels = np.full_like(tokens, pad)                                  # [B, T]
  labels[:, :-1] = tokens[:, 1:]
  next_kind = np.zeros_like(kinds)                                    # [B, T]
  next_kind[:, :-1] = kinds[:, 1:]
  nig = (next_kind == KIND_TARGET) | (next_kind == KIND_EOS)          # [B, T]
  item_tokens, item_kinds = serializer.pack(t_seg, t_len, t_kind, max_item_tokens)  # [B, Ti]
  return {
      "tokens": tokens,
      "labels": labels,
      "nig_mask": nig.astype(np.float32) * weights[:, None],
      "user_mask": (kinds == KIND_HISTORY).astype(np.float32),
      "target_mask": (kinds == KIND_TARGET).astype(np.float32),
      "item_tokens": item_tokens,
      "item_mask": (item_kinds == KIND_TARGET).astype(np.float32),
      "weights": weights,
  }


def build_prompt_batch(serializer: TextSerializer, histories: np.ndarray,
                       max_tokens: int) -> Tuple[np.ndarray, np.ndarray]:
  """Generation prompts: the user part, LEFT-padded so every row ends at the same column.

  The model continues after the trailing next-item prefix with the next item's text.

  Args:
    serializer: the TextSerializer.
    histories: [B, H] left-padded history item ids (0 = padding).
    max_tokens: T; the oldest items are dropped to fit.

  Returns:
    (tokens [B, T] int32, mask [B, T] bool: True on real tokens).
  """
  histories = np.asarray(histories)
  b = histories.shape[0]
  seg, lens, kinds = serializer.user_segments(
      histories, np.full(b, max_tokens, np.int64), np.ones(b, bool))
  tokens, kind_out = serializer.pack(seg, lens, kinds, max_tokens, left_pad=True)
  return tokens, kind_out != KIND_PAD


def build_item_batch(serializer: TextSerializer, item_ids: np.ndarray,
                     max_item_tokens: int) -> Tuple[np.ndarray, np.ndarray]:
  """Catalogue items alone (text + eos, right-padded), for embedding retrieval.

  The same tokens as ``item_tokens`` of ``build_train_batch``, so a catalogue embedding v_T
  matches the in-batch ones.

  Args:
    serializer: the TextSerializer.
    item_ids: [N] item ids; id 0 gives an all-padding row.
    max_item_tokens: Ti.

  Returns:
    (tokens [N, Ti] int32, mask [N, Ti] float32: 1 on the text tokens, without eos).
  """
  item_ids = np.asarray(item_ids, np.int64).reshape(-1)
  seg, lens, kinds = serializer.target_segments(
      item_ids, max_item_tokens, np.ones(len(item_ids), bool))
  tokens, kind_out = serializer.pack(seg, lens, kinds, max_item_tokens)
  return tokens, (kind_out == KIND_TARGET).astype(np.float32)


class MixtureIterator:
  """Stage-I mixture of per-category batch iterators, deterministic from (seed, step).

  Category ``c`` is drawn with probability ``n_c**power / sum_k n_k**power`` (``n_c``: users in
  category c; ``power`` < 1 up-samples small categories).  Step ``s`` draws its category from
  ``np.random.default_rng([seed, s])``, so the sequence of categories does not depend on
  restarts.  Every step takes a WHOLE batch from one category: the in-batch contrastive
  negatives then come from the same catalogue (negatives from another category would be trivially
  easy), and each category keeps its own item-id space, so ids of different categories never meet
  in one batch.

  Yields ``(category_index, batch)``.
  """

  def __init__(self, iterators: Sequence[Any], num_users: Sequence[int], power: float = 0.3,
               seed: int = 0, names: Optional[Sequence[str]] = None):
    """Creates the mixture at step 0.

    Args:
      iterators: one iterator of batches per category, each with ``get_state()`` /
        ``set_state()`` (e.g. ``TrainIterator``).
      num_users: [K] users per category (> 0).
      power: the sampling exponent.
      seed: non-negative int.
      names: optional category names (for logs).
    """
    if len(iterators) == 0 or len(iterators) != len(num_users):
      raise ValueError(f"need one user count per iterator, got {len(iterators)} iterators and "
                       f"{len(num_users)} counts")
    counts = np.asarray(num_users, np.float64)
    if np.any(counts <= 0):
      raise ValueError(f"user counts must be positive, got {list(num_users)}")
    self._iterators = list(iterators)
    self._power = float(power)
    weights = counts ** self._power
    self._probs = weights / weights.sum()
    self._cdf = np.cumsum(self._probs)
    self._seed = int(seed)
    self._step = 0
    self.names = list(names) if names is not None else [str(k) for k in range(len(iterators))]

  @property
  def probabilities(self) -> np.ndarray:
    """[K] category sampling probabilities."""
    return self._probs.copy()

  @property
  def step(self) -> int:
    return self._step

  def category_at(self, step: int) -> int:
    """The category drawn at ``step``."""
    u = np.random.default_rng([self._seed, int(step)]).random()
    return min(int(np.searchsorted(self._cdf, u, side="right")), len(self._probs) - 1)

  def get_state(self) -> Dict[str, Any]:
    """JSON-serialisable state: the step and every child iterator's state."""
    return {"step": int(self._step), "children": [it.get_state() for it in self._iterators]}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores ``get_state()``; the following batches are then identical."""
    children = list(state["children"])
    if len(children) != len(self._iterators):
      raise ValueError(f"state has {len(children)} child states for {len(self._iterators)} "
                       "iterators")
    for it, child in zip(self._iterators, children):
      it.set_state(child)
    self._step = int(state["step"])

  def __iter__(self) -> Iterator[Tuple[int, Any]]:
    return self

  def __next__(self) -> Tuple[int, Any]:
    c = self.category_at(self._step)
    batch = next(self._iterators[c])
    self._step += 1
    return c, batch
