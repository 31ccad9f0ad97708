"""Serving a CALRec workdir: generation + BM25 merge (or v_U . v_T) top-K, same API and files.

  rec = CalrecRecommender.from_workdir(workdir)     # config, tokenizer, decoder, BM25, once
  rec.recommend(["242", "302"], k=10)               # one history: a Recommendation
  rec.recommend([["242"], ["302", "377"]])          # a batch: a list of Recommendation
  rec.recommend(["242"], method="embedding")        # rank the catalogue by v_U . v_T instead
  rec.write_topk("recs.jsonl", k=100)               # every user (or users=[...]) to JSONL

The results, the JSONL rows ({"user", "items", "scores"}), the `.tmp` + rename + `.meta.json`
crash safety, the skip of a complete file and the per-process shards are those of
`seqrec_jax.recommend.Recommender` (its helpers are reused), so consumers cannot tell the two
apart except by the meaning of the scores.

What a user's recommendation is.  As for the item-id models, the history is the user's whole
sequence (training, validation and test items), so the items are predicted *next* ones.  Its last
`config.data.max_len` items are serialised with the training template, oldest first, inside the
prompt budget `calrec.max_tokens - calrec.max_item_tokens` (the oldest items are dropped to fit:
`text/examples.py`), exactly as the final evaluation builds its prompts.

`method="generate"` (the default, CALRec's inference):
  1. sample `calrec.num_samples` continuations of the prompt (`generate.sample`, temperature
     `calrec.sample_temperature`, up to `calrec.max_new_tokens` tokens or EOS);
  2. decode each to text and keep its top `calrec.top_r` BM25 hits over the category's item texts
     (parameters `calrec.bm25_k1`, `calrec.bm25_b`);
  3. merge the num_samples lists with the config's rule (`calrec.merge`: qrr | rr | max, see
     `calrec_jax/ranking.py`; `calrec.epsilon` for qrr), keep the first K (after dropping the
     history's items with exclude_seen).
  A row holds fewer than K items when the samples retrieved fewer distinct items (at most
  num_samples x top_r; an empty or out-of-vocabulary text retrieves nothing).
  Scores follow the merge's order (non-increasing along a row; ties are in round-robin order) and
  are comparable within a row only:
    qrr:  -(best rank - epsilon x (lists holding the item - 1)), minus the item's effective round;
    rr:   -(best rank), minus the round-robin round in which the item is taken;
    max:  the item's best BM25 score over the sampled texts.
  Sampling is random; results are a deterministic function of (history, rng_seed): each prompt's
  samples draw from fold_in(key(rng_seed), CRC-32 of its prompt tokens), one key per prompt, so a
  user gets the same items alone, in any batch, in a file or from `recommend` (up to float
  differences between batch shapes that would have to flip a sampled token; never seen in tests).

`method="embedding"` ranks every catalogue item by v_U . v_T, the periodic validation's ranking:
v_U is the mean last-layer state over the prompt tokens, v_T the mean over the item's text
encoded alone; with `calrec.similarity = "cosine"` both are L2-normalised, so the scores are
cosines (dot products otherwise).  `user_vectors` and `item_embeddings` return those vectors.

Categories.  A Stage I workdir holds several categories, each with its own items, users and BM25
index: `category=` names one (default: the only one, or the only trained one).
"""

from __future__ import annotations

import functools
import os
import zlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from calrec_jax import config as config_lib
from calrec_jax import experiment
from calrec_jax import generate as generate_lib
from calrec_jax import ranking
from calrec_jax.models import decoder as decoder_lib
from calrec_jax.text import examples as examples_lib
from calrec_jax.text import tokenizer as tokenizer_lib
from seqrec_jax import checkpointing
from seqrec_jax import large_catalog
from seqrec_jax import loop
from seqrec_jax import recommend as seqrec_recommend
from seqrec_jax import sharding
# Re-exported: callers catch the same error type and get the same result type as for id models.
from seqrec_jax.recommend import Recommendation, UnknownIdError  # pylint: disable=unused-import

METHODS = ("generate", "embedding")
_MAX_SEED = 2**32  # the seed is a uint32 scalar on the device


def prompt_seeds(tokens: np.ndarray) -> np.ndarray:
  """[B, T] int32 prompts -> [B] uint32 CRC-32 of each row: a per-prompt, batch-free key part."""
  tokens = np.ascontiguousarray(tokens, dtype="<i4")  # fixed byte order: the same on every host
  return np.fromiter((zlib.crc32(row.tobytes()) for row in tokens), np.uint32, len(tokens))


def sample_step(params: Any, batch: Dict[str, jax.Array], seed: jax.Array, *,
                model: decoder_lib.Decoder, num_samples: int, max_new_tokens: int,
                temperature: float, eos_id: int, pad_id: int) -> jax.Array:
  """Samples continuations of a batch of prompts, one PRNG key per prompt, inside jit.

  Args:
    params: decoder parameters.
    batch: `tokens` [B, T] int32 left-padded prompts, `mask` [B, T] int32 (1 on real tokens),
      `seeds` [B] uint32 (`prompt_seeds`).
    seed: uint32 scalar, the user's rng_seed.
    model: the decoder.
    num_samples, max_new_tokens, temperature, eos_id, pad_id: as in `generate.sample`.

  Returns:
    [B, num_samples, max_new_tokens] int32 tokens.
  """
  base = jax.random.key(seed)
  keys = jax.vmap(lambda s: jax.random.fold_in(base, s))(batch["seeds"])  # [B]
  return generate_lib.sample(model, params, batch["tokens"], batch["mask"].astype(bool), keys,
                             num_samples=num_samples, max_new_tokens=max_new_tokens,
                             temperature=temperature, eos_id=eos_id, pad_id=pad_id)


def _unit(x: jax.Array) -> jax.Array:
  # The evaluator's normalisation (experiment._embedding_sums), so that the scores are the same.
  return x * jax.lax.rsqrt(jnp.sum(x ** 2, -1, keepdims=True) + 1e-12)


def user_vector_step(params: Any, batch: Dict[str, jax.Array], *, model: decoder_lib.Decoder,
                     cosine: bool) -> jax.Array:
  """[B, D] float32 v_U of a batch of prompts (L2-normalised when cosine)."""
  v = experiment.pool_hidden(model, params, batch["tokens"], batch["mask"], left_padded=True)
  return _unit(v) if cosine else v


def embedding_topk_step(params: Any, batch: Dict[str, jax.Array], item_vectors: jax.Array, *,
                        model: decoder_lib.Decoder, cosine: bool, k: int,
                        exclude_seen: bool) -> Tuple[jax.Array, jax.Array]:
  """Top-K items by v_U . v_T of a batch of prompts, inside jit.

  Args:
    params: decoder parameters.
    batch: `tokens`, `mask` as in `sample_step`; with exclude_seen `history` [B, H] int32 item
      ids to remove (0 is padding, already -inf).
    item_vectors: [n_items + 1, D] v_T (row 0 padding), normalised when cosine.
    model: the decoder.
    cosine: normalise v_U.
    k: K.
    exclude_seen: set the history's scores to -inf first.

  Returns:
    (ids [B, K] int32, scores [B, K] float32), best first, equal scores in ascending id order.
  """
  v = user_vector_step(params, batch, model=model, cosine=cosine)  # [B, D]
  scores = v @ item_vectors.T  # [B, V + 1]
  scores = scores.at[:, 0].set(-jnp.inf)
  if exclude_seen:
    rows = jnp.arange(scores.shape[0])[:, None]  # [B, 1]
    scores = scores.at[rows, batch["history"]].set(-jnp.inf)
  top_scores, top_ids = large_catalog.grouped_top_k(scores, k)  # [B, K], == lax.top_k
  return top_ids.astype(jnp.int32), top_scores


def merge_scores(ids: np.ndarray, scores: np.ndarray, merged: np.ndarray, rule: str,
                 epsilon: float) -> np.ndarray:
  """The score of every merged item under its rule (see the module docstring).

  Args:
    ids: [B, N, R] retrieved item ids per sampled text, best first, 0 = padding.
    scores: [B, N, R] their BM25 scores.
    merged: [B, M] `ranking.merge_batch` output of the same lists, 0-padded.
    rule: "quasi_round_robin", "round_robin" or "max_score".
    epsilon: quasi_round_robin's modulation factor.

  Returns:
    [B, M] float64: -effective round (qrr), -best rank (rr) or the best BM25 score (max); -inf
    on padding.
  """
  b, n, r = ids.shape
  real = merged > 0  # [B, M]
  best_rank = np.full(merged.shape, np.inf)  # [B, M] 1-based
  n_lists = np.zeros(merged.shape, np.int64)  # [B, M]
  best_score = np.full(merged.shape, -np.inf)  # [B, M]
  ranks = np.arange(1, r + 1, dtype=np.float64)
  for j in range(n):  # one list at a time: O(B R M) memory
    hit = (ids[:, j, :, None] == merged[:, None, :]) & real[:, None, :]  # [B, R, M]
    found = hit.any(axis=1)  # [B, M]
    first = np.argmax(hit, axis=1)  # [B, M] 0-based rank of the item's (best) copy
    best_rank = np.where(found, np.minimum(best_rank, ranks[first]), best_rank)
    n_lists += found
    list_best = np.where(hit, scores[:, j, :, None].astype(np.float64), -np.inf).max(axis=1)
    best_score = np.maximum(best_score, list_best)
  if rule == "quasi_round_robin":
    out = -(best_rank - epsilon * (n_lists - 1))
  elif rule == "round_robin":
    out = -best_rank
  elif rule == "max_score":
    out = best_score
  else:
    raise ValueError(f"unknown merge rule {rule!r}; expected one of {ranking.RULES}")
  return np.where(real, out, -np.inf)


def first_k(ids: np.ndarray, scores: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
  """The first k finite-score entries of every row, order kept; [B, k] padded with (0, -inf)."""
  keep = np.isfinite(scores)
  order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept entries first, in order
  out_ids = np.take_along_axis(ids, order, axis=1)
  out_scores = np.take_along_axis(scores, order, axis=1)
  out_scores = np.where(np.take_along_axis(keep, order, axis=1), out_scores, -np.inf)
  pad = k - out_ids.shape[1]
  if pad > 0:  # fewer candidates than k
    out_ids = np.pad(out_ids, ((0, 0), (0, pad)))
    out_scores = np.pad(out_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
  return np.where(np.isfinite(out_scores), out_ids, 0), out_scores


class CalrecRecommender:
  """A CALRec workdir's best decoder, ready to recommend for any history.

  Build it with `CalrecRecommender.from_workdir`.  Attributes (read-only in spirit): workdir,
  config, tokenizer, categories (experiment.Category, with serializers), model, params,
  partitioner, best_step, batch_size, indexes ({category: BM25Index}).
  """

  def __init__(self, *, workdir: str, config: ml_collections.ConfigDict, tokenizer: Any,
               categories: Sequence[experiment.Category], model: decoder_lib.Decoder,
               params: Any, param_shardings: Any, partitioner: sharding.Partitioner,
               best_step: int, batch_size: int):
    self.workdir = workdir
    self.config = config
    self.c = config.calrec
    self.tokenizer = tokenizer
    self.categories = {cat.name: cat for cat in categories}
    self.model = model
    self.params = params
    self.param_shardings = param_shardings
    self.partitioner = partitioner
    self.best_step = best_step
    self.max_len = int(config.data.max_len)
    self.prompt_len = int(self.c.max_tokens) - int(self.c.max_item_tokens)
    self.cosine = self.c.similarity == "cosine"
    self.merge_rule = config_lib.MERGE_RULES[self.c.merge]
    trained = [cat.name for cat in categories] if self.c.train_on == "all" else [
        s.strip() for s in str(self.c.train_on).split(",")]
    # The evaluator owns the item-side pooling (v_T) and the BM25 settings: reuse, not re-derive.
    self._evaluator = experiment.CalrecEvaluator(list(categories), trained, model, partitioner,
                                                 param_shardings, tokenizer, config)
    self.indexes = {cat.name: self._evaluator.bm25(cat) for cat in categories}
    self._default = (categories[0].name if len(categories) == 1 else
                     trained[0] if len(trained) == 1 else None)
    lookups = {name: seqrec_recommend.id_lookups(cat.split.dataset)
               for name, cat in self.categories.items()}
    self._item_index = {name: v[0] for name, v in lookups.items()}
    self._user_index = {name: v[1] for name, v in lookups.items()}
    self._item_json = {name: v[2] for name, v in lookups.items()}
    self._item_vectors: Dict[str, jax.Array] = {}
    self._row_multiple, self.batch_size = seqrec_recommend.global_batch(batch_size, partitioner)
    self._steps: Dict[Any, Callable] = {}

  # -------------------------------------------------------------------------------------------
  # Loading.

  @classmethod
  def from_workdir(cls, workdir: str, *, batch_size: Optional[int] = None,
                   mesh_shape: Optional[Dict[str, int]] = None) -> "CalrecRecommender":
    """Loads config.json, the tokenizer, the categories, the best decoder and BM25 indexes, once.

    Args:
      workdir: a workdir written by `launch/train.py` with a CALRec config.
      batch_size: global prompts per device batch; default `config.eval.batch_size` (rounded up
        to the mesh's batch shards x processes).
      mesh_shape: override `config.mesh.shape` (e.g. {"data": -1}) when serving on other
        hardware than training.

    Returns:
      A CalrecRecommender.

    Raises:
      FileNotFoundError: no config.json, tokenizer or best checkpoint, or a dataset file is gone.
      ValueError: not a CALRec workdir, or a checkpoint that does not fit the decoder.
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = loop.load_workdir_config(workdir)  # names config.json in its errors
    if config.task.name != "calrec":
      raise ValueError(f"{os.path.join(workdir, 'config.json')}: task {config.task.name!r} is not "
                       "CALRec; serve it with seqrec_jax.recommend.Recommender")
    best_dir = os.path.join(workdir, "best")
    if not os.path.isdir(best_dir) or not any(d.isdigit() for d in os.listdir(best_dir)):
      raise FileNotFoundError(f"no best checkpoint under {best_dir}: the run has not finished an "
                              "evaluation yet (or this is not a launch/train.py workdir)")
    tok_dir = os.path.join(workdir, experiment.TOKENIZER_DIR)
    if not os.path.isdir(tok_dir):
      raise FileNotFoundError(f"{tok_dir} not found: the tokenizer the run trained with is needed")
    tokenizer = tokenizer_lib.TextTokenizer.load(tok_dir)
    cats = experiment.load_categories(config)
    for cat in cats:
      cat.serializer = examples_lib.TextSerializer(tokenizer, cat.item_texts)
    mesh_config = config.mesh
    if mesh_shape is not None:
      mesh_config = ml_collections.ConfigDict(config.mesh.to_dict())
      mesh_config.shape = dict(mesh_shape)
      mesh_config.num_devices = -1
    partitioner = sharding.partitioner_from_config(mesh_config)
    model = decoder_lib.Decoder(experiment.decoder_config(config, tokenizer.vocab_size))
    params, shardings, step = _restore_best(workdir, model, partitioner,
                                            int(config.calrec.max_tokens))
    logging.info("CALRec recommender: best step %d of %s (%s)", step, workdir,
                 "; ".join(cat.split.dataset.summary() for cat in cats))
    return cls(workdir=workdir, config=config, tokenizer=tokenizer, categories=cats, model=model,
               params=params, param_shardings=shardings, partitioner=partitioner,
               best_step=step, batch_size=batch_size or int(config.eval.batch_size))

  # -------------------------------------------------------------------------------------------
  # Categories and ids.

  def category(self, name: Optional[str] = None) -> experiment.Category:
    """The category `name`; None = the only one (or the only trained one)."""
    name = name or self._default
    if name is None:
      raise ValueError(f"this workdir has several categories {sorted(self.categories)}: pass "
                       "category=")
    if name not in self.categories:
      raise ValueError(f"unknown category {name!r}; the categories are {sorted(self.categories)}")
    return self.categories[name]

  def item_ids(self, category: Optional[str] = None) -> np.ndarray:
    """Original item ids by dense id ([0] = "[PAD]") of a category."""
    return np.asarray(self.category(category).split.dataset.item_ids, dtype=object)

  def user_ids(self, category: Optional[str] = None) -> np.ndarray:
    """Original user ids by user index of a category."""
    return np.asarray(self.category(category).split.dataset.user_ids, dtype=object)

  def item_index(self, history: Sequence[Any], on_unknown: str = "error", what: str = "history",
                 category: Optional[str] = None) -> np.ndarray:
    """Original item ids -> [n] int32 dense ids (see `seqrec_jax.recommend.dense_item_ids`)."""
    cat = self.category(category)
    return seqrec_recommend.dense_item_ids(history, self._item_index[cat.name], on_unknown, what,
                                           self.workdir)

  def user_index(self, users: Sequence[Any], category: Optional[str] = None) -> np.ndarray:
    """Original user ids -> [n] int64 user indices; unknown ids raise UnknownIdError."""
    cat = self.category(category)
    return seqrec_recommend.dense_user_ids(users, self._user_index[cat.name], self.workdir)

  # -------------------------------------------------------------------------------------------
  # Device steps.

  def _step(self, kind: str, **static) -> Callable:
    """The jitted, mesh-sharded step of `kind` ("generate", "vectors", "embedding"), cached."""
    key = (kind, tuple(sorted(static.items())))
    if key not in self._steps:
      p = self.partitioner
      fields = {"tokens": 2, "mask": 2}
      repl = p.replicated
      if kind == "generate":
        fields["seeds"] = 1
        fn = functools.partial(
            sample_step, model=self.model, num_samples=int(self.c.num_samples),
            max_new_tokens=int(self.c.max_new_tokens),
            temperature=float(self.c.sample_temperature), eos_id=self.tokenizer.eos_id,
            pad_id=self.tokenizer.pad_id)
        extra, out = (repl,), repl
      elif kind == "vectors":
        fn = functools.partial(user_vector_step, model=self.model, cosine=self.cosine)
        extra, out = (), repl
      else:
        if static["exclude_seen"]:
          fields["history"] = 2
        fn = functools.partial(embedding_topk_step, model=self.model, cosine=self.cosine,
                               **static)
        extra, out = (repl,), (repl, repl)
      # Results are replicated (small: [G, N, T] tokens or [G, K]): each process then reads the
      # rows it handles without knowing which devices hold them.
      self._steps[key] = p.partition_step(
          fn, in_shardings=(self.param_shardings,
                            {f: p.batch_sharding(n) for f, n in fields.items()}) + extra,
          out_shardings=out)
    return self._steps[key]

  def _batch_size_for(self, n: int) -> int:
    """Global batch for n rows: a power-of-two bucket (few compilations) up to `batch_size`."""
    rows = seqrec_recommend.shape_bucket(n, 1)
    return min(self.batch_size, -(-rows // self._row_multiple) * self._row_multiple)

  def _run(self, cat: experiment.Category, items: np.ndarray, starts: np.ndarray,
           ends: np.ndarray, kind: str, global_batch: int, extra: Tuple[Any, ...] = (),
           **static) -> Iterator[Tuple[int, int, Any]]:
    """Runs a step over the prompts of sequences `items[starts[i]:ends[i]]`, batch by batch.

    As `seqrec_jax.recommend.Recommender._run`: `process_batches` gives this process's slice of
    each global batch, whose prompts are built here; batch b+1 is dispatched before the caller
    fetches batch b.

    Yields:
      (first global row, number of real rows, device result of the step), in order.
    """
    step = self._step(kind, **static)
    exclude = bool(static.get("exclude_seen", False))
    for lo, real, windows, history in seqrec_recommend.process_batches(
        items, starts, ends, global_batch, self.max_len, exclude):
      tokens, mask = examples_lib.build_prompt_batch(cat.serializer, windows, self.prompt_len)
      batch = {"tokens": tokens, "mask": mask.astype(np.int32)}  # [G/P, T]
      if kind == "generate":
        batch["seeds"] = prompt_seeds(tokens)  # [G/P]
      if history is not None:
        batch["history"] = history  # [G/P, H]
      yield lo, real, step(self.params, self.partitioner.shard_inputs(batch), *extra)

  # -------------------------------------------------------------------------------------------
  # Host side of the generation: texts -> BM25 -> merge.

  def _retrieve(self, cat: experiment.Category, tokens: np.ndarray, histories: Sequence[np.ndarray],
                k: int, exclude_seen: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Sampled tokens of b users -> their top-K (ids [b, K] int64, scores [b, K] float64)."""
    b, n, _ = tokens.shape
    texts = self.tokenizer.decode_batch(list(tokens.reshape(b * n, -1)))
    ids, scores = self.indexes[cat.name].query(texts, int(self.c.top_r), show_progress=False)
    ids, scores = ids.reshape(b, n, -1), scores.reshape(b, n, -1)  # [b, N, R]
    width = ids.shape[1] * ids.shape[2]  # every distinct retrieved item fits
    merged = ranking.merge_batch(ids, scores, rule=self.merge_rule,
                                 epsilon=float(self.c.epsilon), top_k=width)  # [b, N R]
    merged_scores = merge_scores(ids, scores, merged, self.merge_rule, float(self.c.epsilon))
    if exclude_seen:
      for row, history in enumerate(histories):
        merged_scores[row, np.isin(merged[row], history)] = -np.inf
    return first_k(merged, merged_scores, k)

  def _topk_rows(self, cat: experiment.Category, items: np.ndarray, starts: np.ndarray,
                 ends: np.ndarray, k: int, exclude_seen: bool, method: str, rng_seed: int,
                 global_batch: int, local_only: bool
                 ) -> Iterator[Tuple[int, int, np.ndarray, np.ndarray]]:
    """Top-K of sequences, one block of rows at a time.

    Args:
      cat: the category.
      items, starts, ends: the sequences (CSR), dense item ids.
      k: K (<= n_items).
      exclude_seen: drop every item of a sequence from its ranking.
      method: "generate" or "embedding".
      rng_seed: the sampling seed (generate).
      global_batch: rows per global batch.
      local_only: compute only this process's rows of each batch (files); else every row.

    Yields:
      (first row, end row, ids [rows, K], scores [rows, K]); scores -inf mark no candidate.
    """
    procs, me = jax.process_count(), jax.process_index()
    local = global_batch // procs
    if method == "generate":
      seed = np.asarray(rng_seed, np.uint32)  # replicated: every process passes the same
      results = self._run(cat, items, starts, ends, "generate", global_batch, extra=(seed,))
    else:
      results = self._run(cat, items, starts, ends, "embedding", global_batch,
                          extra=(self.item_vectors(cat.name),), k=k,
                          exclude_seen=bool(exclude_seen))
    for lo, real, out in seqrec_recommend.prefetched(results):
      first, last = (me * local, min(real, (me + 1) * local)) if local_only else (0, real)
      if last <= first:
        continue
      if method == "generate":
        tokens = seqrec_recommend.fetch(out)[first:last]
        histories = [items[starts[i]:ends[i]] for i in range(lo + first, lo + last)]
        ids, scores = self._retrieve(cat, tokens, histories, k, exclude_seen)
      else:
        ids = seqrec_recommend.fetch(out[0])[first:last]
        scores = seqrec_recommend.fetch(out[1])[first:last]
      yield lo + first, lo + last, ids, scores

  def _check(self, k: int, method: str, rng_seed: int, cat: experiment.Category) -> int:
    """Validates the arguments of a top-K call; returns K clipped to the category's catalogue."""
    if method not in METHODS:
      raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 0 <= int(rng_seed) < _MAX_SEED:
      raise ValueError(f"rng_seed must be in [0, 2**32), got {rng_seed}")
    if int(k) < 1:
      raise ValueError(f"k must be >= 1, got {k}")
    return min(int(k), int(cat.split.dataset.n_items))

  def topk_dense(self, sequences: Sequence[np.ndarray], k: int, exclude_seen: bool,
                 method: str = "generate", rng_seed: int = 0,
                 category: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Top-K dense ids and scores of dense-id sequences (see the module docstring).

    Args:
      sequences: n non-empty int arrays of dense item ids, oldest first.
      k: K (clipped to the category's n_items).
      exclude_seen: remove every item of a sequence from its ranking.
      method: "generate" or "embedding".
      rng_seed: sampling seed (generate).
      category: the category (default: see `category`).

    Returns:
      (ids [n, K] int64, scores [n, K] float64); scores of -inf mark no candidate.
    """
    cat = self.category(category)
    k = self._check(k, method, rng_seed, cat)
    lengths = np.asarray([len(s) for s in sequences], dtype=np.int64)
    ends = np.cumsum(lengths)
    items = (np.concatenate(sequences).astype(np.int32) if len(sequences)
             else np.zeros(0, np.int32))
    n = len(sequences)
    ids = np.zeros((n, k), np.int64)
    scores = np.full((n, k), -np.inf)
    for lo, hi, block_ids, block_scores in self._topk_rows(
        cat, items, ends - lengths, ends, k, exclude_seen, method, rng_seed,
        self._batch_size_for(n), local_only=False):
      ids[lo:hi], scores[lo:hi] = block_ids, block_scores
    return ids, scores

  # -------------------------------------------------------------------------------------------
  # Python API.

  def recommend(self, history: Union[Sequence[Any], Sequence[Sequence[Any]]], k: int = 10,
                exclude_seen: bool = True, on_unknown: str = "error",
                category: Optional[str] = None, rng_seed: int = 0, method: str = "generate"
                ) -> Union[Recommendation, List[Recommendation]]:
    """Top-K items for one history or a batch of histories, new users included.

    In a multi-process job this is a collective: every process calls it with the same arguments.

    Args:
      history: one history (a list of original item ids, oldest first) or a batch of them.
      k: number of items (at most the category's catalogue; generation may return fewer).
      exclude_seen: leave the history's items out of the recommendations.
      on_unknown: "error" (raise UnknownIdError naming the unknown ids) or "drop" (ignore them).
      category: the category of the ids (default: the only one, or the only trained one).
      rng_seed: sampling seed; the result is a deterministic function of (history, rng_seed).
      method: "generate" (samples + BM25 + merge) or "embedding" (v_U . v_T).

    Returns:
      A Recommendation for one history, a list of them for a batch; the scores are described in
      the module docstring.

    Raises:
      UnknownIdError: unknown item ids with on_unknown="error".
      ValueError: an empty history (also after dropping), a bad method, seed or category.
    """
    single, batch = seqrec_recommend.split_histories(history)
    dense = [self.item_index(h, on_unknown, what=("history" if single else f"history {i}"),
                             category=category) for i, h in enumerate(batch)]
    ids, scores = self.topk_dense(dense, k, exclude_seen, method, rng_seed, category)
    item_ids = self.item_ids(category)
    out = [_recommendation(item_ids, i, s) for i, s in zip(ids, scores)]
    return out[0] if single else out

  def recommend_users(self, users: Sequence[Any], k: int = 10, exclude_seen: bool = True,
                      category: Optional[str] = None, rng_seed: int = 0,
                      method: str = "generate") -> List[Recommendation]:
    """Top-K items for known users (original user ids), from their whole sequences."""
    ds = self.category(category).split.dataset
    idx = self.user_index(users, category)
    ids, scores = self.topk_dense([ds.items[ds.offsets[u]:ds.offsets[u + 1]] for u in idx], k,
                                  exclude_seen, method, rng_seed, category)
    item_ids = self.item_ids(category)
    return [_recommendation(item_ids, i, s) for i, s in zip(ids, scores)]

  def item_vectors(self, category: Optional[str] = None) -> jax.Array:
    """[n_items + 1, D] replicated v_T of a category (row 0 zero), normalised when cosine."""
    cat = self.category(category)
    if cat.name not in self._item_vectors:
      self._item_vectors[cat.name] = self._evaluator.item_vectors(self.params, cat)
    return self._item_vectors[cat.name]

  def item_embeddings(self, category: Optional[str] = None) -> np.ndarray:
    """[n_items, D] float32 v_T: row r is item `item_ids(category)[r + 1]` (dense id r + 1).

    L2-normalised when `calrec.similarity` is cosine: the embedding method's score of an item is
    the dot product of its row with the user's vector (`user_vectors`).
    """
    vecs = seqrec_recommend.fetch(self.item_vectors(category))
    return np.asarray(vecs[1:], np.float32)

  def user_vectors(self, histories: Sequence[Sequence[Any]], on_unknown: str = "error",
                   category: Optional[str] = None) -> np.ndarray:
    """[n, D] float32 v_U of histories of original item ids (normalised when cosine)."""
    cat = self.category(category)
    dense = [self.item_index(h, on_unknown, what=f"history {i}", category=cat.name)
             for i, h in enumerate(histories)]
    lengths = np.asarray([len(s) for s in dense], dtype=np.int64)
    ends = np.cumsum(lengths)
    items = np.concatenate(dense).astype(np.int32) if dense else np.zeros(0, np.int32)
    out = np.zeros((len(dense), int(self.model.config.d_model)), np.float32)
    for lo, real, vecs in seqrec_recommend.prefetched(
        self._run(cat, items, ends - lengths, ends, "vectors", self._batch_size_for(len(dense)))):
      out[lo:lo + real] = seqrec_recommend.fetch(vecs)[:real]
    return out

  # -------------------------------------------------------------------------------------------
  # Batch top-K to JSONL.

  def write_topk(self, out: str, k: int = 100, *, users: Optional[Sequence[Any]] = None,
                 exclude_seen: bool = False, overwrite: bool = False, progress: bool = True,
                 decimals: Optional[int] = 6, category: Optional[str] = None,
                 rng_seed: int = 0, method: str = "generate") -> Dict[str, Any]:
    """Streams `{"user", "items", "scores"}` JSONL rows, one per user, best item first.

    The file format and its safety are `seqrec_jax.recommend.Recommender.write_topk`'s; a row is
    exactly `recommend_users([user], k, exclude_seen, category, rng_seed, method)`.

    Args:
      out: the output file; in a multi-process run each process writes `shard_path(out, p, P)`.
      k: items per user (clipped to the catalogue size; generation may give fewer).
      users: original user ids in the wanted order; default every user of the category.
      exclude_seen: leave each user's whole history out of its items.
      overwrite: redo a complete file, or one written with other settings.
      progress: tqdm bar (users/s) on process 0.
      decimals: scores are rounded to this many decimals in the file (None: exact).
      category: the category (default: the only one, or the only trained one).
      rng_seed: sampling seed (generate).
      method: "generate" or "embedding".

    Returns:
      {"path", "rows", "skipped", "seconds", "users_per_second"}.

    Raises:
      UnknownIdError: a user id not in the category.
      FileExistsError: a complete file from other settings exists and overwrite is False.
    """
    cat = self.category(category)
    k = self._check(k, method, rng_seed, cat)
    ds = cat.split.dataset
    user_ids = self.user_ids(cat.name)
    user_idx = seqrec_recommend.select_users(
        ds, users, functools.partial(self.user_index, category=cat.name))
    procs, me = jax.process_count(), jax.process_index()
    path = seqrec_recommend.shard_path(out, me, procs)
    g = self._batch_size_for(len(user_idx))
    c = self.c
    generation = ({"rng_seed": int(rng_seed), "num_samples": int(c.num_samples),
                   "sample_temperature": float(c.sample_temperature),
                   "max_new_tokens": int(c.max_new_tokens), "top_r": int(c.top_r),
                   "merge": str(c.merge), "epsilon": float(c.epsilon)}
                  if method == "generate" else {})
    settings = seqrec_recommend.output_settings(
        self.workdir, self.best_step, k, exclude_seen, decimals, user_ids[user_idx], g,
        model="calrec", category=cat.name, method=method, **generation)
    done = seqrec_recommend.complete_output(path, settings, overwrite)
    if done is not None:
      return done
    starts, ends = ds.offsets[user_idx], ds.offsets[user_idx + 1]
    bar = seqrec_recommend.progress_bar(seqrec_recommend.local_row_count(len(user_idx), g),
                                        enabled=progress and me == 0)
    users_out = user_ids[user_idx]
    with seqrec_recommend.RowsWriter(path, settings, ds.item_ids, self._item_json[cat.name],
                                     decimals) as writer:
      for lo, hi, ids, scores in self._topk_rows(cat, ds.items, starts, ends, k, exclude_seen,
                                                 method, rng_seed, g, local_only=True):
        writer.write_block(users_out[lo:hi], ids, scores)
        bar.update(hi - lo)
    bar.close()
    stats = writer.stats()
    logging.info("wrote CALRec (%s) top-%d of %d users to %s in %.1f s (%.0f users/s)", method, k,
                 stats["rows"], path, stats["seconds"], stats["users_per_second"])
    return stats


def _recommendation(item_ids: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> Recommendation:
  keep = np.isfinite(scores)
  return Recommendation(items=[str(x) for x in item_ids[ids[keep]]],
                        scores=np.asarray(scores[keep], np.float64).tolist())


def _restore_best(workdir: str, model: decoder_lib.Decoder, partitioner: sharding.Partitioner,
                  max_tokens: int) -> Tuple[Any, Any, int]:
  """The best checkpoint's decoder parameters on `partitioner`'s mesh (no optimizer state).

  CALRec's task parameters are the decoder's alone, so the restore target is the decoder's
  abstract init (`jax.eval_shape`, nothing is computed) with its logical shardings.

  Returns:
    (params, their shardings, best step).

  Raises:
    ValueError: the checkpoint's parameters do not have the decoder's shapes (a changed config,
      tokenizer or code version).
  """
  with partitioner.context():
    boxed = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)},
                                              jnp.ones((1, max_tokens), jnp.int32))["params"])
    shardings = partitioner.logical_shardings(boxed)
  abstract = nn.meta.unbox(boxed)
  ckpt = checkpointing.Checkpointer(workdir, max_to_keep=1, async_save=False)
  try:
    step = ckpt.best_step()
    saved = _shapes(ckpt.best_params_metadata(step))
    want = _shapes(abstract)
    if saved != want:
      diff = {k: (saved.get(k), v) for k, v in want.items() if saved.get(k) != v}
      diff.update({k: (v, None) for k, v in saved.items() if k not in want})
      raise ValueError(
          f"the best checkpoint {os.path.join(workdir, 'best', str(step))} does not hold the "
          f"decoder config.json describes (checkpoint vs expected shapes, first differences: "
          f"{dict(list(diff.items())[:4])}); did the config, the tokenizer or the code version "
          "change since training?")
    params, _ = ckpt.restore_best(partitioner.abstract_with_shardings(abstract, shardings))
  finally:
    ckpt.close()
  return params, shardings, int(step)


def _shapes(tree: Any) -> Dict[str, Tuple[int, ...]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in flat}
