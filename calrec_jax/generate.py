"""Batched sampling from the CALRec decoder with its KV cache.

`sample` prefills each left-padded prompt once, repeats the filled cache `num_samples` times
(row b -> rows b * num_samples ... b * num_samples + num_samples - 1: cheaper than tiling the
prompt, whose prefill would then run num_samples times), and then decodes one token per step in a
`lax.while_loop` that stops as soon as every row has emitted EOS (or after max_new_tokens).
Everything, prefill included, is one jitted computation per (model, shapes, static settings).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

from calrec_jax.models.decoder import Decoder, DecoderConfig, init_cache, repeat_cache


def _choose(logits: jax.Array, key: jax.Array, step: int, temperature: float,
            top_k: int) -> jax.Array:
  """[N, V] float32 logits -> [N] int32 tokens: argmax at temperature 0, else a sample.

  `key` is one key (drawn jointly for all N rows: a row's draw depends on its position) or [B]
  keys, one per prompt, whose N / B consecutive rows are its samples (a row's draw depends on
  its prompt's key only, not on the batch around it).  Step t draws with fold_in(key, t).
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [N, 1] the k-th largest logit
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  # A raw uint32 key (shape [2]) is one key; `sample` wraps raw keys, so only typed [B] keys
  # reach here as per-prompt keys.
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or key.ndim == 0:
    return jax.random.categorical(jax.random.fold_in(key, step), logits, axis=-1).astype(
        jnp.int32)
  per_prompt = logits.reshape(key.shape[0], -1, logits.shape[-1])  # [B, N / B, V]
  draw = jax.vmap(lambda k, l: jax.random.categorical(jax.random.fold_in(k, step), l, axis=-1))
  return draw(key, per_prompt).reshape(-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "num_samples", "max_new_tokens",
                                             "temperature", "eos_id", "pad_id", "top_k"))
def _sample(model: Decoder, params: Any, prompt_tokens: jax.Array, prompt_mask: jax.Array,
            rng: jax.Array, *, num_samples: int, max_new_tokens: int, temperature: float,
            eos_id: Optional[int], pad_id: int, top_k: int) -> Tuple[jax.Array, jax.Array]:
  """`sample`'s computation; also returns the number of tokens generated before stopping."""
  b, prompt_len = prompt_tokens.shape
  n = b * num_samples
  cache = init_cache(model, b, prompt_len + max_new_tokens)

  # Prefill: only the last position's logits are needed, so skip the [B, Lp, V] output matmul.
  hidden, mutated = model.apply({"params": params, "cache": cache}, prompt_tokens,
                                key_mask=prompt_mask, decode=True, mutable=["cache"],
                                method=Decoder.hidden)
  logits = model.apply({"params": params}, hidden[:, -1], method=Decoder.logits_from_hidden)
  cache = repeat_cache(mutated["cache"], num_samples)
  logits = jnp.repeat(logits, num_samples, axis=0)  # [N, V]

  def is_eos(tokens):
    return tokens == eos_id if eos_id is not None else jnp.zeros(tokens.shape, bool)

  first = _choose(logits, rng, 0, temperature, top_k)  # [N]
  out = jnp.full((n, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

  def cond(state):
    step, _, _, _, done = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, cache, out, last, done = state
    (logits, _), mutated = model.apply({"params": params, "cache": cache}, last[:, None],
                                       decode=True, mutable=["cache"])
    token = _choose(logits[:, -1], rng, step, temperature, top_k)
    token = jnp.where(done, pad_id, token)  # finished rows only pad
    out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
    return step + 1, mutated["cache"], out, token, done | is_eos(token)

  state = (jnp.ones((), jnp.int32), cache, out, first, is_eos(first))
  steps, _, out, _, _ = jax.lax.while_loop(cond, body, state)
  return out.reshape(b, num_samples, max_new_tokens), steps


def sample(model: Decoder, params: Any, prompt_tokens: jax.Array, prompt_mask: jax.Array,
           rng: jax.Array, *, num_samples: int, max_new_tokens: int, temperature: float,
           eos_id: Optional[int], pad_id: int, top_k: int = 0) -> jax.Array:
  """Samples continuations of a batch of prompts.

  Args:
    model: the Decoder (static: hashable by its config).
    params: its parameters (`variables["params"]`, unboxed).
    prompt_tokens: [B, Lp] int32 prompts, LEFT-padded with pad_id so that every row ends at the
      last column; every row needs at least one real token.
    prompt_mask: [B, Lp] bool, True for real prompt tokens.
    rng: a PRNG key, drawn jointly for all rows (step t uses fold_in(rng, t)), so a prompt's
      samples depend on its position in the batch; or [B] keys, one per prompt, whose samples
      then depend only on that prompt and its key, whatever batch it is decoded in (serving
      relies on this: a user's recommendations must not change with the batch).  Raw uint32
      keys ([2] or [B, 2]) are accepted too.
    num_samples: continuations per prompt.
    max_new_tokens: tokens generated per continuation.
    temperature: softmax temperature; 0 = greedy (argmax; all samples of a prompt agree).
      Static: each distinct value compiles once.
    eos_id: end-of-sequence token; a row stops after emitting it (the EOS is kept) and the loop
      ends early once every row has.  None = never stop early.
    pad_id: written after a row's EOS.
    top_k: sample among the k most likely tokens only (0 = the whole vocabulary).

  Returns:
    [B, num_samples, max_new_tokens] int32 tokens.
  """
  if num_samples < 1 or max_new_tokens < 1:
    raise ValueError(f"num_samples={num_samples} and max_new_tokens={max_new_tokens} must be >= 1")
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0")
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)  # the same random bits as the raw key
  if rng.ndim not in (0, 1) or (rng.ndim == 1 and rng.shape[0] != prompt_tokens.shape[0]):
    raise ValueError(f"rng must be one key or one key per prompt ({prompt_tokens.shape[0]}), "
                     f"got keys of shape {rng.shape}")
  tokens, _ = _sample(model, params, jnp.asarray(prompt_tokens, jnp.int32),
                      jnp.asarray(prompt_mask, bool), rng, num_samples=num_samples,
                      max_new_tokens=max_new_tokens, temperature=float(temperature),
                      eos_id=None if eos_id is None else int(eos_id), pad_id=int(pad_id),
                      top_k=int(top_k))
  return tokens


def generation_flops(config: DecoderConfig, batch: int, prompt_len: int, new_tokens: int) -> float:
  """Forward FLOPs of `sample` for `batch` decoded rows, for tokens/s and MFU reporting.

  Every token fed through the blocks (the prompt and all generated tokens but the last) costs
  2 (N - V D) for the projections (N = `config.matmul_params()`) plus 4 n_layers H K S for
  attention scores and mixing over the S = prompt_len + new_tokens cache slots it reads (the
  implementation attends over the whole cache, masked); each generated token also costs one
  output-layer row, 2 V D.

  Args:
    config: the decoder config.
    batch: rows decoded (prompts x num_samples).  The prefill is counted for every row: an upper
      bound, since `sample` prefills each prompt once and repeats its cache.
    prompt_len: Lp.
    new_tokens: tokens generated per row (max_new_tokens; fewer if every row stopped early).

  Returns:
    Total FLOPs.
  """
  output_layer = 2.0 * config.vocab_size * config.d_model
  slots = prompt_len + new_tokens
  per_token = (2.0 * config.matmul_params() - output_layer +
               4.0 * config.n_layers * config.n_heads * config.head_dim * slots)
  return batch * ((prompt_len + new_tokens - 1) * per_token + new_tokens * output_layer)
