"""Hugging Face Llama/Gemma checkpoints -> Decoder: logits match transformers' torch models."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from calrec_jax.models import convert  # pylint: disable=g-import-not-at-top
from calrec_jax.models import decoder as dec  # pylint: disable=g-import-not-at-top

VOCAB = 101


def _randomise(model, seed):
  """Replaces HF's init (tiny weights, unit norms) with O(1)-logit random weights."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim == 1:  # norm weights: around 1 (Llama) or 0 (Gemma's 1 + w)
        base = 0.0 if "gemma" in type(model).__name__.lower() else 1.0
        p.copy_(base + 0.2 * noise)
      else:
        p.copy_(0.15 * noise)


def _save(model, path, **kwargs):
  model.save_pretrained(str(path), safe_serialization=True, **kwargs)
  return str(path)


def _llama(tmp_path, tie=False, seed=0, name="llama", **save_kwargs):
  torch.set_num_threads(1)
  cfg = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      rms_norm_eps=1e-5, tie_word_embeddings=tie, rope_theta=500.0)
  model = transformers.LlamaForCausalLM(cfg).eval()
  _randomise(model, seed)
  if tie:
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
  return model, _save(model, tmp_path / name, **save_kwargs)


def _batch():
  """Two left-padded rows (lengths 9 and 5) and their HF position ids (cumsum of the mask)."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, VOCAB, (2, 9)).astype(np.int64)
  mask = np.ones((2, 9), bool)
  mask[1, :4] = False
  tokens[1, :4] = 0
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  return tokens, mask, positions


def _torch_logits(model, tokens, mask, positions):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(tokens),
                 attention_mask=torch.from_numpy(mask.astype(np.int64)),
                 position_ids=torch.from_numpy(positions)).logits.float().numpy()


def _our_logits(cfg, params, tokens, mask):
  model = dec.Decoder(cfg)
  fn = jax.jit(lambda p, t, m: model.apply({"params": p}, t, key_mask=m)[0])
  return np.asarray(fn(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)))


def _check(torch_model, cfg, params):
  tokens, mask, positions = _batch()
  want = _torch_logits(torch_model, tokens, mask, positions)
  got = _our_logits(cfg, params, tokens, mask)
  assert np.abs(want).max() > 1.0  # compare O(1) numbers, not near-zero ones
  # padded positions are arbitrary in both; compare the real ones
  np.testing.assert_allclose(got[mask], want[mask], atol=1e-4, rtol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_llama_logits_match(tmp_path, tie):
  model, path = _llama(tmp_path, tie=tie)
  cfg, params = convert.load_hf_decoder(path, dtype="float32")
  assert cfg.tie_embeddings == tie and not cfg.parallel_block and cfg.n_kv_heads == 2
  assert cfg.rope_theta == 500.0 and cfg.norm_eps == 1e-5
  assert ("lm_head" in params) == (not tie)
  assert sum(np.size(x) for x in jax.tree.leaves(params)) == cfg.num_params()
  assert convert.load_hf_decoder(path, config_only=True, dtype="float32") == (cfg, None)
  _check(model, cfg, params)


def test_sharded_checkpoint_and_scan_layers(tmp_path):
  model, path = _llama(tmp_path, seed=1, max_shard_size="40KB")
  assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
  assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
  cfg, params = convert.load_hf_decoder(path, dtype="float32", scan_layers=True)
  assert params["blocks"]["layers"]["attention"]["query"].shape == (2, 64, 4, 16)
  _check(model, cfg, params)


def test_bfloat16_checkpoint(tmp_path):
  model, _ = _llama(tmp_path, seed=2)
  path = _save(model.to(torch.bfloat16), tmp_path / "bf16")
  cfg, params = convert.load_hf_decoder(path, dtype="float32")
  want = model.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(params["blocks"]["layer_1"]["mlp"]["down"], want)
  assert params["embedding"].dtype == np.float32


def test_gemma_logits_match(tmp_path):
  torch.set_num_threads(1)
  hf_cfg = transformers.GemmaConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=64)
  model = transformers.GemmaForCausalLM(hf_cfg).eval()
  _randomise(model, 3)
  path = _save(model, tmp_path / "gemma")
  cfg, params = convert.load_hf_decoder(path, dtype="float32")
  assert cfg.embed_scale and cfg.norm_offset and cfg.mlp_activation == "gelu"
  assert cfg.head_dim == 32 and cfg.n_kv_heads == 1 and cfg.tie_embeddings
  _check(model, cfg, params)


def test_clear_errors(tmp_path):
  _, path = _llama(tmp_path, seed=4)
  config_path = os.path.join(path, "config.json")
  with open(config_path) as f:
    hf = json.load(f)

  bad = dict(hf, model_type="gpt2", architectures=["GPT2LMHeadModel"])
  with pytest.raises(convert.ConversionError, match=r"config\.json.*gpt2"):
    convert.config_from_hf(bad, config_path)
  with pytest.raises(convert.ConversionError, match="RoPE scaling"):
    convert.config_from_hf(dict(hf, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}))
  with pytest.raises(convert.ConversionError, match="attention_bias"):
    convert.config_from_hf(dict(hf, attention_bias=True))

  cfg = convert.config_from_hf(hf, dtype="float32")
  tensors, origin = convert.read_tensors(path)
  missing = {k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}
  with pytest.raises(convert.ConversionError, match=r"layers\.1\.mlp\.up_proj.*model\.safetensors"):
    convert.params_from_tensors(missing, cfg, origin)
  extra = dict(tensors, **{"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)})
  with pytest.raises(convert.ConversionError, match="q_proj.bias"):
    convert.params_from_tensors(extra, cfg, origin)
  with pytest.raises(convert.ConversionError, match="shape"):
    convert.params_from_tensors(tensors, convert.config_from_hf(dict(hf, intermediate_size=80)))
  with pytest.raises(convert.ConversionError, match="model.safetensors"):
    convert.load_hf_decoder(str(tmp_path))  # no checkpoint there
