"""CALRec's text side: item attribute texts, the history template, tokenizers, token batches."""

from calrec_jax.text.examples import build_item_batch
from calrec_jax.text.examples import build_prompt_batch
from calrec_jax.text.examples import build_train_batch
from calrec_jax.text.examples import MixtureIterator
from calrec_jax.text.examples import TextSerializer
from calrec_jax.text.templates import CANONICAL_FIELDS
from calrec_jax.text.templates import example_text
from calrec_jax.text.templates import FIRST_ITEM_PREFIX
from calrec_jax.text.templates import history_text
from calrec_jax.text.templates import item_attribute_texts
from calrec_jax.text.templates import NEXT_ITEM_PREFIX
from calrec_jax.text.templates import TEMPLATE_PIECES
from calrec_jax.text.templates import tokenizer_corpus
from calrec_jax.text.templates import USER_PREFIX
from calrec_jax.text.tokenizer import TextTokenizer
from calrec_jax.text.tokenizer import train_tokenizer

__all__ = [
    "CANONICAL_FIELDS", "FIRST_ITEM_PREFIX", "MixtureIterator", "NEXT_ITEM_PREFIX",
    "TEMPLATE_PIECES", "TextSerializer", "TextTokenizer", "USER_PREFIX", "build_item_batch",
    "build_prompt_batch", "build_train_batch", "example_text", "history_text",
    "item_attribute_texts", "tokenizer_corpus", "train_tokenizer",
]
