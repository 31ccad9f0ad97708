"""Builds a CALRec experiment for the spine's loop (`seqrec_jax.loop.train_and_evaluate`).

What differs from the item-id models, and lives here:
  * data: one or several categories (Stage I mixes them, Stage II trains on one), each a
    leave-one-out split whose item-id batches are serialised to text on the host;
  * a tokenizer trained on every category's item texts (or loaded: a Stage I workdir's, a
    pretrained model's), saved in the workdir so Stage II and serving reuse it;
  * initial parameters from scratch, from a Stage I workdir's best checkpoint, or from a local
    Hugging Face checkpoint;
  * evaluation: the periodic validation ranks every catalogue item by v_U . v_T (cheap, one
    forward per user and item); the final valid/test evaluation also samples candidate texts and
    ranks the catalogue with BM25 merged three ways (see calrec_jax/ranking.py).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from calrec_jax import bm25 as bm25_lib
from calrec_jax import config as config_lib
from calrec_jax import generate as generate_lib
from calrec_jax import losses
from calrec_jax import ranking
from calrec_jax import task as task_lib
from calrec_jax.models import decoder as decoder_lib
from calrec_jax.text import examples as examples_lib
from calrec_jax.text import templates
from calrec_jax.text import tokenizer as tokenizer_lib
from seqrec_jax import checkpointing
from seqrec_jax import data as data_lib
from seqrec_jax import metrics as metrics_lib
from seqrec_jax import optim
from seqrec_jax import sharding
from seqrec_jax import train_state as ts

TOKENIZER_DIR = "tokenizer"


@dataclasses.dataclass
class Category:
  """One category's data: its split and the serializer of its item texts."""
  name: str
  split: Any
  item_texts: List[str]
  serializer: Any = None

  @property
  def n_users(self) -> int:
    return self.split.dataset.n_users


def category_specs(config: ml_collections.ConfigDict) -> List[Tuple[str, str, str]]:
  """[(name, format, path)] from config.calrec.categories, or the one dataset of config.data."""
  if config.calrec.categories:
    return [tuple(str(s).split("|")) for s in config.calrec.categories]
  name = config.data.name or ("ml-100k" if not config.data.path else
                              os.path.basename(os.path.normpath(config.data.path)))
  return [(name, config.data.format, config.data.path)]


def load_categories(config: ml_collections.ConfigDict) -> List[Category]:
  """Reads and splits every category; builds their item attribute texts."""
  from seqrec_jax import loop  # pylint: disable=g-import-not-at-top  (loop imports us lazily)
  cats = []
  for name, fmt, path in category_specs(config):
    data_config = ml_collections.ConfigDict(config.data.to_dict())
    data_config.update(format=fmt, path=path, name=name)
    split = loop.load_split(ml_collections.ConfigDict({"data": data_config}))
    texts = templates.item_attribute_texts(split.dataset, fields=tuple(config.calrec.fields),
                                           max_chars=int(config.calrec.max_field_chars))
    cats.append(Category(name, split, list(texts)))
  return cats


def make_tokenizer(config: ml_collections.ConfigDict, cats: Sequence[Category], workdir: str):
  """The run's tokenizer, saved in `workdir/tokenizer` for resumption, Stage II and serving.

  Priority: the workdir's own (a resumed run) > the pretrained model's > the Stage I workdir's >
  `calrec.tokenizer.path` > one trained here on every category's item texts.
  """
  c = config.calrec
  saved = os.path.join(workdir, TOKENIZER_DIR) if workdir else ""
  sources = [saved, c.pretrained, os.path.join(c.init_from, TOKENIZER_DIR) if c.init_from else "",
             c.tokenizer.path]
  tok = None
  for source in sources:
    if source and os.path.exists(source):
      logging.info("tokenizer from %s", source)
      tok = tokenizer_lib.TextTokenizer.load(source)
      break
    if source and source != saved:
      raise FileNotFoundError(f"tokenizer source {source} does not exist")
  if tok is None:
    corpus = templates.tokenizer_corpus([t for cat in cats for t in cat.item_texts[1:]])
    tok = tokenizer_lib.train_tokenizer(corpus, vocab_size=int(c.tokenizer.vocab_size),
                                        kind=c.tokenizer.kind)
    logging.info("trained a %s tokenizer of %d tokens on %d texts", c.tokenizer.kind,
                 tok.vocab_size, len(corpus))
  if saved and not os.path.exists(saved) and jax.process_index() == 0:
    # Written aside and renamed, so another process (or a resumed run) never reads half a file.
    staging = f"{saved}.tmp-{os.getpid()}"
    tok.save(staging)
    os.replace(staging, saved)
  return tok


def _runtime_fields(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """DecoderConfig fields set by the run, not by the architecture."""
  return dict(max_len=int(config.calrec.max_tokens), dropout=float(config.model.dropout),
              dtype=config.model.dtype, remat=bool(config.model.remat),
              scan_layers=bool(config.model.scan_layers))


def decoder_config(config: ml_collections.ConfigDict, vocab_size: int):
  """The decoder's frozen config: a pretrained checkpoint's, or the preset with overrides."""
  if config.calrec.pretrained:
    from calrec_jax.models import convert  # pylint: disable=g-import-not-at-top
    dcfg, _ = convert.load_hf_decoder(config.calrec.pretrained, config_only=True,
                                      **_runtime_fields(config))
    return dcfg
  overrides = {k: int(v) for k, v in config.model.overrides.items() if int(v) > 0}
  padded_vocab = -(-vocab_size // 128) * 128  # even vocab-axis sharding
  return decoder_lib.preset(config.model.preset, vocab_size=padded_vocab,
                            **_runtime_fields(config), **overrides)


class TextBatches:
  """Item-id batches (one category's, or the Stage I mixture's) serialised to token batches."""

  def __init__(self, cats: Sequence[Category], config: ml_collections.ConfigDict):
    c = config.calrec
    names = [cat.name for cat in cats]
    wanted = names if c.train_on == "all" else [s.strip() for s in c.train_on.split(",")]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
      raise ValueError(f"config.calrec.train_on names {unknown}; the categories are {names}")
    self.cats = [cat for cat in cats if cat.name in wanted]
    iterators = [data_lib.TrainIterator(cat.split, config.data.max_len, config.train.batch_size,
                                        seed=config.seed) for cat in self.cats]
    self.max_tokens = int(c.max_tokens)
    self.max_item_tokens = int(c.max_item_tokens)
    if len(iterators) == 1:
      self.mixture = None
      self.source = iterators[0]
      self.steps_per_epoch = iterators[0].steps_per_epoch
    else:
      self.mixture = examples_lib.MixtureIterator(
          iterators, [cat.n_users for cat in self.cats], power=float(c.mixture_power),
          seed=config.seed)
      self.source = self.mixture
      # One "epoch" of the mixture: as many steps as one pass over every category's examples.
      self.steps_per_epoch = sum(it.steps_per_epoch for it in iterators)
      logging.info("Stage I mixture over %s with probabilities %s", [x.name for x in self.cats],
                   np.round(self.mixture.probabilities, 4).tolist())
    self._steps = 0

  @property
  def epoch(self) -> int:
    return self._steps // max(self.steps_per_epoch, 1)

  def get_state(self) -> Dict[str, Any]:
    return {"source": self.source.get_state(), "steps": self._steps}

  def set_state(self, state: Dict[str, Any]) -> None:
    self.source.set_state(state["source"])
    self._steps = int(state["steps"])

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    if self.mixture is None:
      cat, batch = self.cats[0], next(self.source)
    else:
      index, batch = next(self.mixture)
      cat = self.cats[index]
    self._steps += 1
    out = examples_lib.build_train_batch(cat.serializer, batch["inputs"], batch["targets"],
                                         batch["weights"], self.max_tokens, self.max_item_tokens)
    out["target_ids"] = batch["targets"].astype(np.int32)
    return {k: out[k] for k in task_lib.TRAIN_FIELDS}


def _sum_over_processes(sums: Dict[str, float]) -> Dict[str, float]:
  """Host-side metric sums of every process added up (each process ranks its own users)."""
  if jax.process_count() == 1:
    return sums
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  keys = sorted(sums)
  local = np.asarray([float(sums[k]) for k in keys], np.float64)
  total = np.asarray(multihost_utils.process_allgather(local)).sum(axis=0)
  return dict(zip(keys, total.tolist()))


def pool_hidden(model, params, tokens, mask, left_padded: bool):
  """Mean of last-layer states over `mask` [B, T] -> [B, D] float32."""
  if left_padded:
    positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
    hidden = model.apply({"params": params}, tokens, positions=positions, key_mask=mask,
                         method=model.hidden)
  else:
    hidden = model.apply({"params": params}, tokens, method=model.hidden)
  return losses.masked_mean(hidden, mask)


def _generation_sums(model, params, tokens, labels, nig_mask):
  """Summed target-text token cross-entropy and the token count of one batch (no dropout)."""
  logits, _ = model.apply({"params": params}, tokens)
  gen = losses.generation_loss(logits, labels, nig_mask)
  return {"ce": gen["nig"] * gen["tokens"], "tokens": gen["tokens"]}


def _embedding_sums(user_vecs, item_vecs, targets, weights, *, similarity, ks):
  """Full-catalogue ranking by v_U . v_T: Recall/NDCG sums (row 0 of item_vecs is padding)."""
  if similarity == "cosine":
    user_vecs = user_vecs * jax.lax.rsqrt(jnp.sum(user_vecs ** 2, -1, keepdims=True) + 1e-12)
  scores = user_vecs @ item_vecs.T  # [B, V+1]
  scores = scores.at[:, 0].set(-jnp.inf)
  ranks = metrics_lib.target_ranks(scores, targets)
  return metrics_lib.ranking_sums(ranks, weights, ks)


def _rename(metrics: Dict[str, float], ks) -> Dict[str, float]:
  """Spine names (HR@k, NDCG@k) -> calrec_jax.ranking's (Recall@k, NDCG@k; one target each)."""
  return {key: metrics[key.replace("Recall@", "HR@")] for key in ranking.metric_keys(ks)}


class CalrecEvaluator:
  """Embedding-retrieval validation (periodic) and generation + BM25 evaluation (final)."""

  def __init__(self, cats, train_names, model, partitioner, param_shardings, tokenizer, config):
    self.cats = cats
    self.model = model
    self.partitioner = partitioner
    self.tokenizer = tokenizer
    self.config = config
    self.c = config.calrec
    self.ks = tuple(config.eval.ks)
    self.batch_size = int(config.eval.batch_size)
    self.train_names = train_names  # the early-stop mean runs over the trained categories
    rows = lambda n: partitioner.batch_sharding(n)  # noqa: E731
    repl = partitioner.replicated
    self._pool_items = partitioner.partition_step(
        functools.partial(pool_hidden, model, left_padded=False),
        in_shardings=(param_shardings, rows(2), rows(2)), out_shardings=rows(2))
    self._pool_users = partitioner.partition_step(
        functools.partial(pool_hidden, model, left_padded=True),
        in_shardings=(param_shardings, rows(2), rows(2)), out_shardings=rows(2))
    self._emb_sums = partitioner.partition_step(
        functools.partial(_embedding_sums, similarity=self.c.similarity, ks=self.ks),
        in_shardings=(rows(2), repl, rows(1), rows(1)), out_shardings=repl)
    self._sample = partitioner.partition_step(
        functools.partial(generate_lib.sample, model, num_samples=int(self.c.num_samples),
                          max_new_tokens=int(self.c.max_new_tokens),
                          temperature=float(self.c.sample_temperature),
                          eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id),
        in_shardings=(param_shardings, rows(2), rows(2), repl), out_shardings=rows(3))
    self._gen_sums = partitioner.partition_step(
        functools.partial(_generation_sums, model),
        in_shardings=(param_shardings, rows(2), rows(2), rows(2)), out_shardings=repl)
    self._bm25 = {}

  # ----- helpers

  def _users(self, cat: Category, limit: int, seed_offset: int):
    """The evaluated users of a category: all, or a fixed random subset of `limit`."""
    users = cat.split.eval_users
    if limit and limit < len(users):
      rng = np.random.default_rng(self.config.seed + seed_offset)
      users = np.sort(rng.choice(users, size=limit, replace=False))
    return dataclasses.replace(cat.split, eval_users=users)

  def item_vectors(self, params, cat: Category) -> jax.Array:
    """v_T of every catalogue item, [n_items + 1, D] (row 0 zero), normalised if cosine."""
    n = cat.split.dataset.n_items
    ids = np.arange(1, n + 1)
    pad = (-len(ids)) % self.batch_size
    ids = np.concatenate([ids, np.zeros(pad, ids.dtype)])
    vecs = []
    for lo in range(0, len(ids), self.batch_size):
      tokens, mask = examples_lib.build_item_batch(cat.serializer, ids[lo:lo + self.batch_size],
                                                   int(self.c.max_item_tokens))
      shard = self.partitioner.shard_inputs({"t": tokens, "m": mask.astype(np.int32)})
      vecs.append(self._pool_items(params, shard["t"], shard["m"]))
    vecs = jnp.concatenate(vecs)[:n]
    if self.c.similarity == "cosine":
      vecs = vecs * jax.lax.rsqrt(jnp.sum(vecs ** 2, -1, keepdims=True) + 1e-12)
    vecs = jnp.concatenate([jnp.zeros((1, vecs.shape[1]), vecs.dtype), vecs])
    return jax.device_put(vecs, self.partitioner.replicated)

  def _prompt_batches(self, cat, split, stage):
    for batch in data_lib.eval_batches(split, stage, self.config.data.max_len, self.batch_size):
      tokens, mask = examples_lib.build_prompt_batch(
          cat.serializer, batch["inputs"],
          int(self.c.max_tokens) - int(self.c.max_item_tokens))
      yield batch, tokens, mask.astype(np.int32)

  def embedding_metrics(self, params, cat, stage, users_limit) -> Dict[str, float]:
    split = self._users(cat, users_limit, 1 if stage == "valid" else 2)
    item_vecs = self.item_vectors(params, cat)
    total = None
    for batch, tokens, mask in self._prompt_batches(cat, split, stage):
      shard = self.partitioner.shard_inputs({"t": tokens, "m": mask, "y": batch["targets"],
                                             "w": batch["weights"]})
      v_u = self._pool_users(params, shard["t"], shard["m"])
      total = metrics_lib.accumulate(total, self._emb_sums(v_u, item_vecs, shard["y"], shard["w"]))
    return _rename(metrics_lib.normalise(jax.device_get(total), self.ks), self.ks)

  def generation_loss(self, params, cat, stage, users_limit) -> float:
    """Mean token cross-entropy of the held-out item's text given the history (L_NIG on valid)."""
    split = self._users(cat, users_limit, 1 if stage == "valid" else 2)
    total = None
    for batch in data_lib.eval_batches(split, stage, self.config.data.max_len, self.batch_size):
      built = examples_lib.build_train_batch(cat.serializer, batch["inputs"], batch["targets"],
                                             batch["weights"], int(self.c.max_tokens),
                                             int(self.c.max_item_tokens))
      shard = self.partitioner.shard_inputs({k: built[k] for k in ("tokens", "labels",
                                                                    "nig_mask")})
      total = metrics_lib.accumulate(total, self._gen_sums(params, shard["tokens"],
                                                           shard["labels"], shard["nig_mask"]))
    total = jax.device_get(total)
    return float(total["ce"]) / max(float(total["tokens"]), 1.0)

  def bm25(self, cat: Category):
    if cat.name not in self._bm25:
      self._bm25[cat.name] = bm25_lib.BM25Index(cat.item_texts, k1=float(self.c.bm25_k1),
                                                b=float(self.c.bm25_b))
    return self._bm25[cat.name]

  def generation_metrics(self, params, cat, stage, users_limit) -> Dict[str, Dict[str, float]]:
    """Sample texts, BM25 them, merge three ways: {"qrr": {...}, "rr": {...}, "max": {...}}."""
    split = self._users(cat, users_limit, 1 if stage == "valid" else 2)
    index = self.bm25(cat)
    depth = max(self.ks)
    sums = {rule: None for rule in config_lib.MERGE_RULES}
    rng = jax.random.key(self.config.seed + 7)
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    n_batches = data_lib.num_eval_batches(split, self.batch_size)
    progress = tqdm(total=n_batches, desc=f"generate {cat.name}/{stage}", unit="batch",
                    disable=jax.process_index() != 0 or not self.config.train.progress)
    for i, (batch, tokens, mask) in enumerate(self._prompt_batches(cat, split, stage)):
      shard = self.partitioner.shard_inputs({"t": tokens, "m": mask})
      out = self._sample(params, shard["t"], shard["m"].astype(bool), jax.random.fold_in(rng, i))
      out = self._local_rows(out)  # [b, N, T]: this process's rows, aligned with `batch`
      b, n, _ = out.shape
      texts = self.tokenizer.decode_batch(list(out.reshape(b * n, -1)))
      ids, scores = index.query(texts, int(self.c.top_r))
      ids = ids.reshape(b, n, -1)
      scores = scores.reshape(b, n, -1)
      for rule, name in config_lib.MERGE_RULES.items():
        ranked = ranking.merge_batch(ids, scores, rule=name, epsilon=float(self.c.epsilon),
                                     top_k=depth)
        got = ranking.recall_ndcg(ranked, batch["targets"], ks=self.ks, weights=batch["weights"])
        sums[rule] = ranking.accumulate(sums[rule], got)
      progress.update(1)
    progress.close()
    return {rule: ranking.normalise(_sum_over_processes(s), self.ks) for rule, s in sums.items()}

  def _local_rows(self, array: jax.Array) -> np.ndarray:
    """The rows of a batch-sharded global array that this process fed in, as numpy."""
    if jax.process_count() == 1:
      return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    spec = jax.sharding.PartitionSpec(self.partitioner.batch_axes)
    return np.asarray(multihost_utils.global_array_to_host_local_array(
        array, self.partitioner.mesh, spec))

  # ----- the loop's two entry points

  def _combine(self, per_cat: Dict[str, Dict[str, float]], mean_over: Sequence[str]):
    """Prefixes per-category keys when there are several; the unprefixed keys are the mean."""
    if len(per_cat) == 1:
      return dict(next(iter(per_cat.values())))
    out = {}
    for name, metrics in per_cat.items():
      out.update({f"{name}/{k}": v for k, v in metrics.items()})
    for key in next(iter(per_cat.values())):
      out[key] = float(np.mean([per_cat[n][key] for n in mean_over]))
    return out

  def __call__(self, params, stage: str) -> Dict[str, float]:
    """Periodic validation: embedding retrieval on `eval_users` users of each category."""
    per_cat = {}
    for cat in self.cats:
      m = self.embedding_metrics(params, cat, stage, int(self.c.eval_users))
      per_cat[cat.name] = {f"emb/{k}": v for k, v in m.items()}
      per_cat[cat.name]["gen/nig"] = self.generation_loss(params, cat, stage,
                                                          int(self.c.eval_users))
    return self._combine(per_cat, self.train_names)

  def final(self, params, stage: str) -> Dict[str, float]:
    """Final evaluation: generation + BM25 (three merges) and embedding retrieval."""
    per_cat = {}
    for cat in self.cats:
      limit = int(self.c.test_users)
      metrics = {f"emb/{k}": v for k, v in
                 self.embedding_metrics(params, cat, stage, limit).items()}
      metrics["gen/nig"] = self.generation_loss(params, cat, stage, limit)
      for rule, m in self.generation_metrics(params, cat, stage, limit).items():
        prefix = "" if rule == self.c.merge else f"{rule}/"
        metrics.update({f"{prefix}{k}": v for k, v in m.items()})
      per_cat[cat.name] = metrics
    return self._combine(per_cat, self.train_names)


def _load_init_params(config, state_params, param_shardings, partitioner):
  """Parameters from a Stage I workdir or a pretrained HF checkpoint, placed like `state_params`."""
  c = config.calrec
  if c.init_from:
    ckpt = checkpointing.Checkpointer(c.init_from, async_save=False)
    try:
      target = partitioner.abstract_with_shardings(state_params, param_shardings)
      params, meta = ckpt.restore_best(target)
    finally:
      ckpt.close()
    logging.info("initialised from %s (best step %s)", c.init_from, meta.get("step"))
    return params
  if c.pretrained:
    from calrec_jax.models import convert  # pylint: disable=g-import-not-at-top
    _, loaded = convert.load_hf_decoder(c.pretrained, **_runtime_fields(config))
    got = jax.tree.structure(loaded)
    want = jax.tree.structure(state_params)
    if got != want:
      raise ValueError(f"{c.pretrained}: converted parameter tree does not match the decoder "
                       f"({got} vs {want})")
    return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x, np.float32), s), loaded,
                        param_shardings)
  return None


def build_experiment(config: ml_collections.ConfigDict, split=None, workdir: str = ""):
  """The CALRec counterpart of `seqrec_jax.loop.build_experiment` (same Experiment fields)."""
  from seqrec_jax import loop  # pylint: disable=g-import-not-at-top
  del split  # CALRec reads its categories itself
  cats = load_categories(config)
  tokenizer = make_tokenizer(config, cats, workdir)
  for cat in cats:
    cat.serializer = examples_lib.TextSerializer(tokenizer, cat.item_texts)
  partitioner = sharding.partitioner_from_config(config.mesh)
  logging.info("mesh %s over %d devices in %d processes", dict(partitioner.mesh.shape),
               partitioner.mesh.size, jax.process_count())
  # pylint: disable=protected-access
  loop._check_batch(config.train.batch_size, partitioner, "config.train.batch_size")
  loop._check_batch(config.eval.batch_size, partitioner, "config.eval.batch_size")

  model = decoder_lib.Decoder(decoder_config(config, tokenizer.vocab_size))
  task = task_lib.CalrecTask(model, task_lib.LossConfig.from_config(config.calrec),
                             int(config.calrec.max_tokens))
  iterator = TextBatches(cats, config)
  steps_per_epoch = iterator.steps_per_epoch
  num_steps = loop._num_steps(config, steps_per_epoch)  # pylint: disable=protected-access
  tx = optim.make_optimizer(config.optim, num_steps)
  state, state_shardings = partitioner.partition_init(
      functools.partial(ts.init_state, task=task, tx=tx), jax.random.key(config.seed))
  loaded = _load_init_params(config, state.params, state_shardings.params, partitioner)
  if loaded is not None:
    state = state.replace(params=loaded)  # Adam's moments start at zero either way
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  logging.info("decoder %s: %s parameters, vocab %d; %d steps/epoch, %d steps planned",
               config.model.preset, f"{n_params:,}", tokenizer.vocab_size, steps_per_epoch,
               num_steps)
  step_fn = partitioner.partition_step(
      functools.partial(ts.train_step, task=task, tx=tx),
      in_shardings=(state_shardings, {k: partitioner.batch_sharding(n)
                                      for k, n in task.train_fields.items()}, {}),
      out_shardings=(state_shardings, partitioner.replicated),
      donate_argnums=(0,))

  def train_step(state, host_batch):
    return step_fn(state, partitioner.shard_inputs(host_batch), {})

  train_step.jitted = step_fn.jitted
  train_step.device_batch = partitioner.shard_inputs
  train_step.consts = {}
  evaluator = CalrecEvaluator(cats, [cat.name for cat in iterator.cats], model, partitioner,
                              state_shardings.params, tokenizer, config)
  summary = "; ".join(cat.split.dataset.summary() for cat in cats)
  exp = loop.Experiment(config, cats[0].split, partitioner, model, task, {}, tx, state,
                        state_shardings, train_step, evaluator, iterator, steps_per_epoch,
                        num_steps, n_params, final_evaluate=evaluator.final, summary=summary)
  exp.tokenizer = tokenizer
  exp.categories = cats
  return exp
