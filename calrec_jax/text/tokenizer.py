"""Sub-word tokenizers for CALRec's serialised histories, on the HF `tokenizers` library.

``train_tokenizer`` trains a small tokenizer on the item texts (no download):

* ``kind="bpe"``: byte-level BPE (GPT-2 style): every byte is in the base alphabet, so every
  string round-trips exactly through encode -> decode.
* ``kind="unigram"``: SentencePiece-style Unigram LM over Metaspace pre-tokens ("▁" marks a
  space), with byte fallback ("<0x00>".."<0xFF>") for characters the training texts never
  showed; round-trips any text that does not itself contain "▁" (U+2581).  Metaspace prepends
  nothing (``prepend_scheme="never"``) so that separately encoded pieces decode to their plain
  concatenation, which the example builder relies on.

Both reserve ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3.

``TextTokenizer`` wraps any ``tokenizers.Tokenizer`` with its pad/bos/eos ids; ``load`` also reads a
local Hugging Face tokenizer directory (``tokenizer.json`` plus ``tokenizer_config.json`` /
``special_tokens_map.json``).
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional, Sequence

from absl import logging
import numpy as np

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
KINDS = ("bpe", "unigram")

TOKENIZER_FILE = "tokenizer.json"
SPECIAL_IDS_FILE = "calrec_special_tokens.json"

_ENCODE_CHUNK = 8192  # texts per `encode_batch` call: bounds the memory held in `Encoding`s
_UNIGRAM_SCORE_DECIMALS = 5
_BYTE_FALLBACK_PENALTY = 10.0  # byte pieces score below every learnt piece

# Fallback names of special tokens when a HF directory's configs do not name them, in order.
_FALLBACK_TOKENS = {
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|endoftext|>"),
    "bos": ("<bos>", "<s>", "<|begin_of_text|>", "<|endoftext|>", "[CLS]"),
    "eos": ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>", "[SEP]"),
}
# tokenizer_config.json keys that stand in for bos/eos in encoder-style (BERT) tokenizers.
_CONFIG_ALIASES = {"pad": ("pad_token",), "bos": ("bos_token", "cls_token"),
                   "eos": ("eos_token", "sep_token")}


def _require_tokenizers():
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the CALRec tokenizer needs Hugging Face `tokenizers` "
                      "(pip install tokenizers)") from e
  return tokenizers


class TextTokenizer:
  """A `tokenizers.Tokenizer` with the special ids CALRec needs; numpy in, numpy out.

  Attributes:
    tokenizer: the wrapped `tokenizers.Tokenizer` (padding and truncation switched off).
    pad_id: padding id.
    bos_id: beginning-of-sequence id.
    eos_id: end-of-sequence id (ends the generated target text).
  """

  def __init__(self, tokenizer, pad_id: int, bos_id: int, eos_id: int):
    """Wraps a tokenizer.

    Args:
      tokenizer: a `tokenizers.Tokenizer`.  Its padding and truncation are disabled here, since
        a ``tokenizer.json`` saved by `transformers` often switches them on and examples must be
        built from unpadded, untruncated token arrays.
      pad_id: padding id.
      bos_id: beginning-of-sequence id.
      eos_id: end-of-sequence id.
    """
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    for name, value in (("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)):
      if not 0 <= int(value) < vocab:
        raise ValueError(f"{name}={value} is outside the vocabulary (size {vocab})")
    tokenizer.no_padding()
    tokenizer.no_truncation()
    self.tokenizer = tokenizer
    self.pad_id = int(pad_id)
    self.bos_id = int(bos_id)
    self.eos_id = int(eos_id)

  @property
  def vocab_size(self) -> int:
    """Number of ids (embedding rows), added tokens included."""
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
    """Token ids of every text: no special tokens, no padding, no truncation.

    Args:
      texts: N strings.

    Returns:
      N int32 arrays of varying length.
    """
    out = []
    for start in range(0, len(texts), _ENCODE_CHUNK):
      chunk = list(texts[start:start + _ENCODE_CHUNK])
      for enc in self.tokenizer.encode_batch(chunk, add_special_tokens=False):
        out.append(np.asarray(enc.ids, dtype=np.int32))
    return out

  def encode(self, text: str) -> np.ndarray:
    """Token ids of one text (see ``encode_batch``)."""
    return self.encode_batch([text])[0]

  def decode_batch(self, ids: Iterable[Sequence[int]]) -> List[str]:
    """Texts of token id rows; each row stops at its first eos and padding is skipped.

    Args:
      ids: rows of token ids (arrays or lists, any length; a [B, T] array works).

    Returns:
      One string per row.  Special tokens (pad, bos, ...) are not written.
    """
    rows = []
    for row in ids:
      row = np.asarray(row, dtype=np.int64).reshape(-1)
      stop = np.flatnonzero(row == self.eos_id)
      if len(stop):
        row = row[:stop[0]]
      rows.append(row[row != self.pad_id].tolist())
    return self.tokenizer.decode_batch(rows, skip_special_tokens=True)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of one row of ids (see ``decode_batch``)."""
    return self.decode_batch([ids])[0]

  def save(self, directory: str) -> None:
    """Writes ``tokenizer.json`` and the special ids (``calrec_special_tokens.json``).

    Args:
      directory: created if missing.
    """
    os.makedirs(directory, exist_ok=True)
    self.tokenizer.save(os.path.join(directory, TOKENIZER_FILE))
    special = {
        "pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id,
        "pad_token": self.tokenizer.id_to_token(self.pad_id),
        "bos_token": self.tokenizer.id_to_token(self.bos_id),
        "eos_token": self.tokenizer.id_to_token(self.eos_id),
    }
    with open(os.path.join(directory, SPECIAL_IDS_FILE), "w") as f:
      json.dump(special, f, indent=2)

  @classmethod
  def load(cls, path: str, pad_token: Optional[str] = None, bos_token: Optional[str] = None,
           eos_token: Optional[str] = None) -> "TextTokenizer":
    """Loads a saved TextTokenizer or any local Hugging Face tokenizer.

    The special ids come from, in order: the explicit arguments; ``calrec_special_tokens.json``
    (written by ``save``); ``tokenizer_config.json`` and ``special_tokens_map.json`` (``pad_token``,
    ``bos_token`` / ``cls_token``, ``eos_token`` / ``sep_token``); the first of a few usual names
    in the vocabulary ("<pad>", "[PAD]", "<s>", "</s>", "<|endoftext|>", ...).  A tokenizer
    without any padding token (GPT-2, Llama) pads with its eos token.

    Args:
      path: a directory holding ``tokenizer.json``, or the ``tokenizer.json`` file itself.
      pad_token: overrides the padding token (a token string).
      bos_token: overrides the beginning-of-sequence token.
      eos_token: overrides the end-of-sequence token.

    Returns:
      The TextTokenizer.

    Raises:
      FileNotFoundError: no ``tokenizer.json``.
      ValueError: a special token cannot be found (the message names what was tried).
    """
    tokenizers = _require_tokenizers()
    path = os.fspath(path)
    if os.path.isdir(path):
      directory, file = path, os.path.join(path, TOKENIZER_FILE)
    else:
      directory, file = os.path.dirname(path), path
    if not os.path.isfile(file):
      raise FileNotFoundError(
          f"no {TOKENIZER_FILE} at {path} (expected a directory holding {TOKENIZER_FILE} or the "
          "file itself)")
    tok = tokenizers.Tokenizer.from_file(file)

    explicit = {"pad": pad_token, "bos": bos_token, "eos": eos_token}
    ids: Dict[str, Optional[int]] = {}
    tried: Dict[str, List[str]] = {k: [] for k in explicit}
    saved = _read_json(os.path.join(directory, SPECIAL_IDS_FILE))
    configs = [_read_json(os.path.join(directory, name))
               for name in ("tokenizer_config.json", "special_tokens_map.json")]
    for key in ("pad", "bos", "eos"):
      candidates = []
      if explicit[key] is not None:
        candidates.append(("argument", explicit[key]))
      elif saved and f"{key}_id" in saved:
        ids[key] = int(saved[f"{key}_id"])
        continue
      for config, name in zip(configs, ("tokenizer_config.json", "special_tokens_map.json")):
        for alias in _CONFIG_ALIASES[key]:
          token = _token_content(config.get(alias)) if config else None
          if token:
            candidates.append((f"{name}:{alias}", token))
      candidates += [("default name", t) for t in _FALLBACK_TOKENS[key]]
      ids[key] = None
      for source, token in candidates:
        tried[key].append(f"{token!r} ({source})")
        token_id = tok.token_to_id(token)
        if token_id is not None:
          ids[key] = int(token_id)
          break
        if source == "argument":
          raise ValueError(f"{key}_token {token!r} is not in the vocabulary of {file}")
    if ids["pad"] is None and ids["eos"] is not None:
      logging.info("%s has no padding token: padding with the eos token", file)
      ids["pad"] = ids["eos"]
    missing = [k for k in ("pad", "bos", "eos") if ids[k] is None]
    if missing:
      raise ValueError(
          f"cannot find the {', '.join(missing)} token(s) of {file}; tried "
          + "; ".join(f"{k}: {', '.join(tried[k]) or 'nothing'}" for k in missing)
          + ". Pass pad_token= / bos_token= / eos_token= to TextTokenizer.load")
    return cls(tok, pad_id=ids["pad"], bos_id=ids["bos"], eos_id=ids["eos"])


def _read_json(path: str) -> Optional[dict]:
  if not os.path.isfile(path):
    return None
  with open(path, "r", encoding="utf-8") as f:
    return json.load(f)


def _token_content(value) -> Optional[str]:
  """A special token entry of a HF config: a string or an AddedToken dict with "content"."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) and value else None


def train_tokenizer(texts: Iterable[str], vocab_size: int, kind: str = "bpe",
                    min_frequency: int = 2) -> TextTokenizer:
  """Trains a tokenizer on ``texts`` (e.g. item attribute texts plus ``TEMPLATE_PIECES``).

  Deterministic: the same texts give the same ``tokenizer.json`` (HF's Unigram trainer is not:
  see ``_canonical_unigram_pieces`` for how its output is made so).

  Args:
    texts: training texts.
    vocab_size: target vocabulary size, special (and for Unigram, byte-fallback) tokens
      included; the result may be smaller when the texts are too few.
    kind: "bpe" (byte-level BPE) or "unigram" (SentencePiece-style, byte fallback).
    min_frequency: BPE only: minimum count of a merged pair.

  Returns:
    The TextTokenizer, with ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3.

  Raises:
    ValueError: unknown kind, or a vocabulary too small for the base alphabet.
  """
  tokenizers = _require_tokenizers()
  decoders, models = tokenizers.decoders, tokenizers.models
  pre_tokenizers, trainers = tokenizers.pre_tokenizers, tokenizers.trainers
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  texts = list(texts)
  if kind == "bpe":
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
      raise ValueError(f"byte-level BPE needs vocab_size >= {len(alphabet) + len(SPECIAL_TOKENS)}"
                       f" (256 bytes + special tokens), got {vocab_size}")
    tok = tokenizers.Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    # No prefix space: pieces encoded separately then decode to their exact concatenation.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
  else:
    n_learnt = vocab_size - 256
    if n_learnt < len(SPECIAL_TOKENS) + 2:
      raise ValueError(f"unigram needs vocab_size > 262 (256 byte-fallback pieces + special "
                       f"tokens), got {vocab_size}")
    tok = tokenizers.Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.UnigramTrainer(vocab_size=n_learnt, special_tokens=list(SPECIAL_TOKENS),
                                      unk_token=UNK_TOKEN, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok = _unigram_with_byte_fallback(tok)
  ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
  if [ids[t] for t in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
    raise AssertionError(f"special tokens got ids {ids}, expected 0..3")
  logging.info("trained a %s tokenizer on %d texts: %d ids", kind, len(texts),
               tok.get_vocab_size(with_added_tokens=True))
  return TextTokenizer(tok, pad_id=ids[PAD_TOKEN], bos_id=ids[BOS_TOKEN], eos_id=ids[EOS_TOKEN])


def _canonical_unigram_pieces(learnt: List[List]) -> List[List]:
  """Makes a trained Unigram vocabulary independent of hash-map order.

  Two things in HF's Unigram trainer depend on (randomly seeded) hash-map iteration:
  (1) its final step appends the characters the EM pruned away with scores
  ``min_score + k * 1e-4`` in hash-set order, so which character gets which ``k`` changes from
  run to run; (2) sums are taken in hash order, moving scores by ~1e-11.  Here (1) is undone by
  re-dealing that group's scores to its characters in code-point order, and (2) by rounding
  scores to 5 decimals (1e-5 in log-probability never changes a segmentation except between
  exact ties, which the lattice breaks by position).  Pieces are then sorted by (-score, piece).

  Args:
    learnt: ``[[piece, score], ...]`` without the special tokens.

  Returns:
    The canonical ``[[piece, score], ...]``.
  """
  if not learnt:
    return learnt
  step = 1e-4  # HF's min_score_penalty_delta
  low = min(s for _, s in learnt)
  by_k: Dict[int, List[int]] = {}
  for i, (piece, score) in enumerate(learnt):
    k = (score - low) / step
    if len(piece) == 1 and abs(k - round(k)) < 1e-4 and round(k) < len(learnt):
      by_k.setdefault(int(round(k)), []).append(i)
  group = []
  k = 0
  while k in by_k:  # the appended characters take consecutive k from 0
    group += by_k[k]
    k += 1
  scores = sorted(learnt[i][1] for i in group)
  for i, score in zip(sorted(group, key=lambda i: learnt[i][0]), scores):
    learnt[i] = [learnt[i][0], score]
  learnt = [[p, round(float(s), _UNIGRAM_SCORE_DECIMALS)] for p, s in learnt]
  learnt.sort(key=lambda ps: (-ps[1], ps[0]))
  return learnt


def _unigram_with_byte_fallback(tok):
  """Canonicalises a trained Unigram vocabulary and adds byte-fallback pieces."""
  tokenizers = _require_tokenizers()
  spec = json.loads(tok.to_str())
  vocab = spec["model"]["vocab"]                    # [[piece, score], ...], specials first
  n_special = len(SPECIAL_TOKENS)
  head = [[p, 0.0] for p, _ in vocab[:n_special]]
  learnt = _canonical_unigram_pieces([list(ps) for ps in vocab[n_special:]])
  floor = min((s for _, s in learnt), default=0.0) - _BYTE_FALLBACK_PENALTY
  pieces = {p for p, _ in learnt}
  byte_pieces = [[f"<0x{b:02X}>", floor] for b in range(256) if f"<0x{b:02X}>" not in pieces]
  spec["model"]["vocab"] = head + learnt + byte_pieces
  spec["model"]["byte_fallback"] = True
  spec["model"]["unk_id"] = SPECIAL_TOKENS.index(UNK_TOKEN)
  # "▁" -> " " first, then bytes -> UTF-8 (as Llama's tokenizer.json does); no prefix to strip.
  spec["decoder"] = {"type": "Sequence", "decoders": [
      {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
      {"type": "ByteFallback"},
      {"type": "Fuse"},
  ]}
  return tokenizers.Tokenizer.from_str(json.dumps(spec))
