"""CALRec's experiment config: the spine's base config plus `config.calrec` (fields commented)."""

from __future__ import annotations

import ml_collections

from calrec_jax import ranking
from seqrec_jax.default_config import base_config

METRIC_KS = (1, 5, 10)  # the paper reports Recall@1/5/10 and NDCG@10
# Short names of calrec_jax.ranking's rules: quasi-round-robin, plain round-robin, max BM25 score.
MERGE_RULES = {"qrr": "quasi_round_robin", "rr": "round_robin", "max": "max_score"}


def default_calrec_config() -> ml_collections.ConfigDict:
  """CALRec on the embedded ml-100k with a small decoder trained from scratch."""
  c = base_config()
  c.task.name = "calrec"
  c.data.max_len = 20  # history items considered; the token budget then drops the oldest

  c.model = ml_collections.ConfigDict()
  c.model.name = "palm_decoder"
  c.model.preset = "small"  # calrec_jax.models.decoder.PRESETS: tiny | small | base | 1b
  c.model.overrides = ml_collections.ConfigDict({
      "d_model": 0, "n_layers": 0, "n_heads": 0, "n_kv_heads": 0, "head_dim": 0, "mlp_dim": 0,
  })  # > 0 replaces the preset's value
  c.model.dropout = 0.1
  c.model.dtype = "float32"  # compute dtype: bfloat16 on accelerators; XLA:CPU is faster in f32
  c.model.remat = False  # rematerialise each block in the backward pass (memory for FLOPs)
  c.model.scan_layers = False  # nn.scan over layers (faster compile for deep models)
  c.model.loss_positions = "last"  # unused by CALRec (kept so the spine's config check passes)

  c.calrec = ml_collections.ConfigDict()
  # Categories as "name|format|path" strings; empty = the one dataset of config.data.
  c.calrec.categories = ()
  c.calrec.train_on = "all"  # comma-separated category names trained on; "all" = every one
  c.calrec.mixture_power = 0.3  # Stage I: category sampled with prob. ~ (#users)^power
  c.calrec.init_from = ""  # a Stage I workdir: start from its best params and its tokenizer
  c.calrec.pretrained = ""  # a local HF Llama/Gemma directory: its weights and tokenizer
  c.calrec.tokenizer = ml_collections.ConfigDict()
  c.calrec.tokenizer.kind = "bpe"  # bpe | unigram (trained on the item texts of every category)
  c.calrec.tokenizer.vocab_size = 4096
  c.calrec.tokenizer.path = ""  # an existing tokenizer directory instead of training one
  c.calrec.fields = ("title", "brand", "category", "price")  # the paper's item attributes
  c.calrec.max_field_chars = 120  # one attribute value is cut to this many characters
  c.calrec.max_tokens = 256  # history + target tokens per training sequence
  c.calrec.max_item_tokens = 48  # one item's text (+ eos) alone
  # Loss: (1 - alpha - beta) L_NIG + alpha L_TT + beta L_UT.
  c.calrec.alpha = 0.125
  c.calrec.beta = 0.025  # the brief's -0.025 pushes v_U and v_T apart: an ablation row
  c.calrec.temperature = 0.1  # InfoNCE temperature
  c.calrec.similarity = "cosine"  # cosine | dot
  c.calrec.symmetric = False  # also the v_T -> query InfoNCE direction
  c.calrec.z_loss = 0.0  # PaLM auxiliary log(Z)^2 weight
  c.calrec.mask_same_item = True  # in-batch rows with the same target are not negatives
  # Evaluation.
  c.calrec.eval_users = 1000  # users per category in the periodic (embedding) validation; 0 = all
  c.calrec.test_users = 0  # users per category in the final valid/test evaluation; 0 = all
  c.calrec.num_samples = 8  # sampled candidate texts per user
  c.calrec.sample_temperature = 0.7
  c.calrec.max_new_tokens = 48
  c.calrec.top_r = 50  # BM25 hits kept per candidate text
  c.calrec.merge = "qrr"  # the headline rule: qrr | rr | max (all three are reported)
  c.calrec.epsilon = 0.5  # quasi-round-robin modulation (see calrec_jax/ranking.py)
  c.calrec.bm25_k1 = 1.5
  c.calrec.bm25_b = 0.75

  # Periodic validation: emb/* rank items by v_U . v_T; gen/nig is the target-text token loss
  # (select it with early_stop_mode="min").
  c.train.early_stop_metric = "emb/NDCG@10"
  c.train.batch_size = 32
  c.train.num_epochs = 5
  c.train.patience = 3
  c.eval.batch_size = 64
  c.eval.ks = METRIC_KS
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"
  c.optim.name = "adamw"
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 1.0
  return c


def early_stop_keys(config: ml_collections.ConfigDict) -> list:
  """The metric names the periodic validation reports (one may be the early-stop metric)."""
  return [f"emb/{k}" for k in ranking.metric_keys(tuple(config.eval.ks))] + ["gen/nig"]


def validate_calrec(config: ml_collections.ConfigDict) -> None:
  """Checks config.calrec; raises ValueError naming the key."""
  c = config.calrec
  if c.merge not in MERGE_RULES:
    raise ValueError(f"config.calrec.merge={c.merge!r}; known: {sorted(MERGE_RULES)}")
  if c.similarity not in ("cosine", "dot"):
    raise ValueError(f"config.calrec.similarity={c.similarity!r}; known: ('cosine', 'dot')")
  if c.max_item_tokens >= c.max_tokens:
    raise ValueError(f"config.calrec.max_item_tokens={c.max_item_tokens} must be smaller than "
                     f"config.calrec.max_tokens={c.max_tokens}")
  for key in ("num_samples", "max_new_tokens", "top_r", "max_tokens", "max_item_tokens"):
    if int(c[key]) < 1:
      raise ValueError(f"config.calrec.{key} must be >= 1, got {c[key]}")
  if c.max_new_tokens > c.max_item_tokens:
    raise ValueError(f"config.calrec.max_new_tokens={c.max_new_tokens} must be <= "
                     f"config.calrec.max_item_tokens={c.max_item_tokens} (prompts leave that room)")
  if config.train.early_stop_metric not in early_stop_keys(config):
    raise ValueError(f"config.train.early_stop_metric={config.train.early_stop_metric!r} is not "
                     f"one of {early_stop_keys(config)}")
  for spec in c.categories:
    if len(str(spec).split("|")) != 3:
      raise ValueError(f"config.calrec.categories entry {spec!r} must be 'name|format|path'")


def cpu_decoder_budget(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The CPU protocol's decoder and training budget (BENCHMARKS.md §5, ml-100k and Amazon): a
  2-layer d=128 decoder, 800 steps of 32 sequences, validated every 400 steps."""
  c.model.preset = "small"
  c.model.overrides.update(d_model=128, n_layers=2, n_heads=4, head_dim=32, mlp_dim=512)
  c.train.num_steps = 800
  c.train.eval_every_steps = 400
  c.train.batch_size = 32
  c.optim.warmup_steps = 50
  return c


def shrink_calrec_to_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A one-to-two-minute CPU run of the whole pipeline (train, embed, sample, BM25, merge)."""
  c.model.preset = "tiny"
  c.model.overrides.update({k: 0 for k in c.model.overrides})  # the tiny preset as it is
  c.calrec.tokenizer.vocab_size = 512
  c.calrec.max_tokens = 96
  c.calrec.max_item_tokens = 24
  c.calrec.max_new_tokens = 16
  c.calrec.num_samples = 2
  c.calrec.top_r = 20
  c.calrec.eval_users = 64
  c.calrec.test_users = 64
  c.data.max_len = 8
  c.train.num_steps = 30
  c.train.eval_every_steps = 15
  c.train.log_every_steps = 5
  c.train.batch_size = 16
  c.eval.batch_size = 32
  c.optim.warmup_steps = 5
  return c


def loss_ablation_sweep() -> list:
  """L_NIG only, + L_TT, + L_UT, both, and the brief's negative beta (override dicts)."""
  return [{"calrec.alpha": a, "calrec.beta": b}
          for a, b in ((0.0, 0.0), (0.125, 0.0), (0.0, 0.025), (0.125, 0.025), (0.125, -0.025))]
