"""Hugging Face Llama-family checkpoints -> `Decoder` parameters (numpy only, no torch).

Supported `model_type`s: "llama" (LlamaForCausalLM, also LlamaModel checkpoints without an
output layer when embeddings are tied), "mistral" (same layout; only without a sliding window
shorter than the sequences we run) and "gemma" (GemmaForCausalLM: embeddings x sqrt(D), RMSNorm
scaled by (1 + w), tanh-GELU gating, always tied).  All of them are sequential pre-norm blocks
with RMSNorm, rotary embeddings in the "rotate_half" layout, grouped-query attention and no
biases, which `DecoderConfig(parallel_block=False, norm="rms")` reproduces exactly.

Weight layout (torch Linear stores [out, in]; ours are [in, out] with heads split out):
  model.embed_tokens.weight            [V, D]      -> embedding
  model.layers.i.self_attn.q_proj      [H K, D]    -> blocks/layer_i/attention/query [D, H, K]
  model.layers.i.self_attn.k_proj/v_proj [KVH K, D] -> .../attention/key, value [D, KVH, K]
  model.layers.i.self_attn.o_proj      [D, H K]    -> .../attention/out [H, K, D]
  model.layers.i.mlp.gate_proj/up_proj [F, D]      -> .../mlp/gate, up [D, F]
  model.layers.i.mlp.down_proj         [D, F]      -> .../mlp/down [F, D]
  model.layers.i.input_layernorm       [D]         -> .../attn_norm/scale
  model.layers.i.post_attention_layernorm [D]      -> .../mlp_norm/scale
  model.norm.weight                    [D]         -> final_norm/scale
  lm_head.weight                       [V, D]      -> lm_head [D, V] (untied only)
HF's q/k projections already use the rotate_half channel order our RoPE uses, so no permutation.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from calrec_jax.models.decoder import DecoderConfig, stack_layers

_SUPPORTED = ("llama", "mistral", "gemma")
# Buffers some older checkpoints saved alongside the weights; recomputed by us.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(ValueError):
  """The checkpoint cannot be converted (unsupported architecture, missing or odd tensors)."""


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise ConversionError(f"{path} not found: expected a Hugging Face checkpoint directory with "
                          f"config.json and model.safetensors") from None
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path} is not valid JSON: {e}") from None


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json",
                   **overrides) -> DecoderConfig:
  """Maps a Hugging Face config dict to a DecoderConfig.

  Args:
    hf: the parsed config.json.
    source: where it came from (for error messages).
    **overrides: DecoderConfig fields to set on top (dtype, scan_layers, remat, max_len, ...).

  Returns:
    The DecoderConfig.

  Raises:
    ConversionError: an architecture or option the decoder does not implement.
  """
  model_type = hf.get("model_type")
  if model_type not in _SUPPORTED:
    raise ConversionError(f"{source}: model_type={model_type!r} (architectures="
                          f"{hf.get('architectures')}) is not supported; supported: {_SUPPORTED}")

  def need(key):
    if key not in hf:
      raise ConversionError(f"{source}: missing required field {key!r} for model_type "
                            f"{model_type!r}")
    return hf[key]

  # transformers >= 5 keeps RoPE settings in rope_parameters; older configs use rope_theta and
  # rope_scaling at the top level.
  rope = dict(hf.get("rope_parameters") or {})
  scaling = hf.get("rope_scaling")
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if scaling:
    rope_type = scaling.get("rope_type", scaling.get("type", rope_type))
  if rope_type != "default":
    raise ConversionError(f"{source}: RoPE scaling type {rope_type!r} is not supported (only "
                          f"plain rotary embeddings)")
  rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag, False):
      raise ConversionError(f"{source}: {flag}=true is not supported (the decoder has no biases)")

  gemma = model_type == "gemma"
  act = hf.get("hidden_activation") or hf.get("hidden_act") or ("gelu_pytorch_tanh" if gemma
                                                                else "silu")
  if act == "silu":
    mlp_activation = "silu"
  elif act in ("gelu_pytorch_tanh", "gelu_new") or (gemma and act == "gelu"):
    # Gemma checkpoints that say "gelu" were trained with the tanh approximation; transformers
    # runs them with it too.
    mlp_activation = "gelu"
  else:
    raise ConversionError(f"{source}: hidden activation {act!r} is not supported "
                          f"(silu or tanh-approximate gelu)")

  d_model = int(need("hidden_size"))
  n_heads = int(need("num_attention_heads"))
  max_len = int(hf.get("max_position_embeddings", 2048))
  if model_type == "mistral" and hf.get("sliding_window"):
    # Sliding-window attention equals full attention for sequences no longer than the window.
    max_len = min(max_len, int(hf["sliding_window"]))
  fields = dict(
      vocab_size=int(need("vocab_size")),
      d_model=d_model,
      n_layers=int(need("num_hidden_layers")),
      n_heads=n_heads,
      n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
      head_dim=int(hf.get("head_dim") or d_model // n_heads),
      mlp_dim=int(need("intermediate_size")),
      max_len=max_len,
      parallel_block=False,
      norm="rms",
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      mlp_activation=mlp_activation,
      tie_embeddings=True if gemma else bool(hf.get("tie_word_embeddings", False)),
      rope_theta=rope_theta,
      embed_scale=gemma,
      norm_offset=gemma,
      dropout=0.0,
  )
  if model_type == "mistral" and hf.get("sliding_window") and "max_len" in overrides and \
      overrides["max_len"] > fields["max_len"]:
    raise ConversionError(f"{source}: max_len={overrides['max_len']} exceeds Mistral's sliding "
                          f"window {hf['sliding_window']}, which the decoder does not implement")
  fields.update(overrides)
  return DecoderConfig(**fields)


def _raw_safetensors(path: str) -> Dict[str, np.ndarray]:
  """Reads a safetensors file by its header (little-endian u64 length, JSON, raw bytes).

  Used for dtypes `safetensors.numpy` cannot express (bfloat16); the arrays are memory-mapped.
  """
  import ml_dtypes  # pylint: disable=g-import-not-at-top  (a jax dependency)
  dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
            "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
            "BOOL": np.bool_}
  with open(path, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_len))
  data = np.memmap(path, dtype=np.uint8, mode="r")
  base = 8 + header_len
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in dtypes:
      raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    out[name] = data[base + begin:base + end].view(dtypes[info["dtype"]]).reshape(info["shape"])
  return out


def _load_safetensors(path: str) -> Dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return load_file(path)
  except TypeError:
    # numpy has no bfloat16; safetensors.numpy refuses such files.
    return _raw_safetensors(path)


def read_tensors(model_dir: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
  """All tensors of a checkpoint directory, single-file or sharded.

  Args:
    model_dir: holds model.safetensors, or model.safetensors.index.json and its shards.

  Returns:
    (name -> array, name -> file it came from).
  """
  index_path = os.path.join(model_dir, "model.safetensors.index.json")
  single = os.path.join(model_dir, "model.safetensors")
  if os.path.isfile(index_path):
    weight_map = _read_json(index_path).get("weight_map")
    if not weight_map:
      raise ConversionError(f"{index_path} has no weight_map")
    files = sorted(set(weight_map.values()))
  elif os.path.isfile(single):
    files = ["model.safetensors"]
  else:
    raise ConversionError(f"{model_dir}: neither model.safetensors nor "
                          f"model.safetensors.index.json found (pytorch_model.bin checkpoints "
                          f"must be re-saved with safe_serialization=True)")
  tensors, origin = {}, {}
  for name in files:
    path = os.path.join(model_dir, name)
    if not os.path.isfile(path):
      raise ConversionError(f"{index_path} lists shard {name}, which is missing")
    for key, value in _load_safetensors(path).items():
      tensors[key] = value
      origin[key] = path
  return tensors, origin


def params_from_tensors(tensors: Mapping[str, np.ndarray], config: DecoderConfig,
                        origin: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
  """Builds the per-layer (unscanned) parameter tree from HF-named tensors.

  Args:
    tensors: name -> array (names with or without the leading "model.").
    config: the matching DecoderConfig (sequential blocks).
    origin: name -> file, for error messages.

  Returns:
    The `params` tree with numpy arrays of `config.param_dtype`.

  Raises:
    ConversionError: a tensor is missing, has the wrong shape, or is not understood.
  """
  origin = origin or {}
  dtype = np.dtype(config.param_dtype) if config.param_dtype != "bfloat16" else None
  if dtype is None:
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    dtype = np.dtype(ml_dtypes.bfloat16)
  # Accept both LlamaForCausalLM ("model.layers...") and bare LlamaModel ("layers...") names.
  by_name = {}
  for key, value in tensors.items():
    if key.endswith(_IGNORED_SUFFIXES):
      continue
    canonical = key[len("model."):] if key.startswith("model.") else key
    by_name[canonical] = (key, value)
  used = set()

  def take(name, shape):
    if name not in by_name:
      where = sorted(set(origin.values())) or ["the checkpoint"]
      raise ConversionError(f"tensor 'model.{name}' (or {name!r}) is missing from "
                            f"{', '.join(where)}")
    key, value = by_name[name]
    if tuple(value.shape) != tuple(shape):
      raise ConversionError(f"tensor {key!r} in {origin.get(key, 'the checkpoint')} has shape "
                            f"{tuple(value.shape)}, expected {tuple(shape)} from the config")
    used.add(name)
    return np.asarray(value).astype(np.float32)

  d, h, kvh, k, f, v = (config.d_model, config.n_heads, config.n_kv_heads, config.head_dim,
                        config.mlp_dim, config.vocab_size)
  params: Dict[str, Any] = {"embedding": take("embed_tokens.weight", (v, d))}
  blocks = {}
  for i in range(config.n_layers):
    p = f"layers.{i}."
    blocks[f"layer_{i}"] = {
        "attn_norm": {"scale": take(p + "input_layernorm.weight", (d,))},
        "mlp_norm": {"scale": take(p + "post_attention_layernorm.weight", (d,))},
        "attention": {
            "query": take(p + "self_attn.q_proj.weight", (h * k, d)).T.reshape(d, h, k),
            "key": take(p + "self_attn.k_proj.weight", (kvh * k, d)).T.reshape(d, kvh, k),
            "value": take(p + "self_attn.v_proj.weight", (kvh * k, d)).T.reshape(d, kvh, k),
            "out": take(p + "self_attn.o_proj.weight", (d, h * k)).T.reshape(h, k, d),
        },
        "mlp": {
            "gate": take(p + "mlp.gate_proj.weight", (f, d)).T,
            "up": take(p + "mlp.up_proj.weight", (f, d)).T,
            "down": take(p + "mlp.down_proj.weight", (d, f)).T,
        },
    }
  params["blocks"] = blocks
  params["final_norm"] = {"scale": take("norm.weight", (d,))}
  if not config.tie_embeddings:
    params["lm_head"] = take("lm_head.weight", (v, d)).T
  elif "lm_head.weight" in by_name:
    # Tied checkpoints may still store a copy of the table; it must be that copy.
    key, head = by_name["lm_head.weight"]
    if head.shape != (v, d) or not np.array_equal(np.asarray(head, np.float32),
                                                  params["embedding"]):
      raise ConversionError(f"{key!r} in {origin.get(key, 'the checkpoint')} differs from "
                            f"embed_tokens.weight although the config ties them")
    used.add("lm_head.weight")
  unused = sorted(by_name[n][0] for n in set(by_name) - used)
  if unused:
    raise ConversionError(f"tensors the decoder does not implement: {unused[:8]}"
                          f"{' ...' if len(unused) > 8 else ''} (from "
                          f"{', '.join(sorted({origin.get(u, '?') for u in unused}))})")
  return _cast_tree(params, dtype)


def _cast_tree(tree, dtype):
  if isinstance(tree, dict):
    return {k: _cast_tree(v, dtype) for k, v in tree.items()}
  return np.ascontiguousarray(tree.astype(dtype))


def load_hf_decoder(path: str, *, config_only: bool = False,
                    **overrides) -> Tuple[DecoderConfig, Optional[Dict[str, Any]]]:
  """Loads a local Hugging Face Llama/Mistral/Gemma checkpoint as a Decoder.

  Args:
    path: checkpoint directory (config.json + model.safetensors or a sharded
      model.safetensors.index.json).
    config_only: read config.json alone and return (config, None) (no tensors are read).
    **overrides: DecoderConfig fields, e.g. dtype="float32", scan_layers=True, max_len=512.
      With scan_layers the returned params are stacked accordingly.

  Returns:
    (config, params): `Decoder(config).apply({"params": params}, tokens)` reproduces the HF
    model's logits.  params are numpy arrays of config.param_dtype (host memory; shard them with
    the Partitioner).

  Raises:
    ConversionError: unsupported architecture, or missing/misshapen/unexpected tensors.
  """
  config_path = os.path.join(path, "config.json")
  config = config_from_hf(_read_json(config_path), config_path, **overrides)
  if config_only:
    return config, None
  tensors, origin = read_tensors(path)
  params = params_from_tensors(tensors, config, origin)
  if config.scan_layers:
    params = stack_layers(params, config.n_layers)
  return config, params
