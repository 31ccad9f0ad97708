"""CALRec sampling: greedy decoding against a naive loop of full forwards, EOS handling,
temperature / top-k sampling and shapes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calrec_jax import generate
from calrec_jax.models import decoder as dec

PAD = 0
VOCAB = 40


@pytest.fixture(scope="module")
def setup():
  cfg = dec.preset("tiny", vocab_size=VOCAB, max_len=32, parallel_block=False, n_kv_heads=2)
  model = dec.Decoder(cfg)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(0)
  # Large weights make the greedy path depend on the whole context.
  params = jax.tree.map(lambda s: (0.4 * rng.standard_normal(s.shape)).astype(np.float32),
                        nn.meta.unbox(abstract)["params"])
  prompts = np.full((3, 5), PAD, np.int32)
  mask = np.zeros((3, 5), bool)
  for r, n in enumerate([5, 2, 3]):  # left-padded prompts of different lengths
    prompts[r, 5 - n:] = rng.integers(1, VOCAB, n)
    mask[r, 5 - n:] = True
  return model, params, prompts, mask


def naive_greedy(model, params, prompts, mask, steps):
  """Appends argmax tokens one at a time, re-running the full forward pass each time."""
  forward = jax.jit(lambda t, m: model.apply({"params": params}, t, key_mask=m)[0][:, -1])
  tokens, m = np.asarray(prompts), np.asarray(mask)
  out = []
  for _ in range(steps):
    nxt = np.asarray(jnp.argmax(forward(jnp.asarray(tokens), jnp.asarray(m)), -1)).astype(np.int32)
    out.append(nxt)
    tokens = np.concatenate([tokens, nxt[:, None]], 1)
    m = np.concatenate([m, np.ones((len(m), 1), bool)], 1)
  return np.stack(out, 1)  # [B, steps]


def test_greedy_matches_naive_loop_and_eos(setup):
  model, params, prompts, mask = setup
  steps = 6
  want = naive_greedy(model, params, prompts, mask, steps)
  assert len({tuple(r) for r in want}) == 3  # rows differ, so mixing rows up would show
  got = generate.sample(model, params, prompts, mask, jax.random.PRNGKey(0), num_samples=2,
                        max_new_tokens=steps, temperature=0.0, eos_id=None, pad_id=PAD)
  assert got.shape == (3, 2, steps) and got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), np.repeat(want[:, None], 2, 1))

  # EOS: pick a token row 0 emits mid-way; every row stops after its first EOS (kept) and pads.
  eos = int(want[0, 2])
  expected = want.copy()
  for r in range(3):
    hits = np.flatnonzero(expected[r] == eos)
    if hits.size:
      expected[r, hits[0] + 1:] = PAD
  assert (expected == PAD).any()
  got = generate.sample(model, params, prompts, mask, jax.random.PRNGKey(0), num_samples=1,
                        max_new_tokens=steps, temperature=0.0, eos_id=eos, pad_id=PAD)
  np.testing.assert_array_equal(np.asarray(got)[:, 0], expected)

  # top_k=1 sampling at any temperature is greedy
  got = generate.sample(model, params, prompts, mask, jax.random.PRNGKey(5), num_samples=2,
                        max_new_tokens=steps, temperature=1.0, eos_id=None, pad_id=PAD, top_k=1)
  np.testing.assert_array_equal(np.asarray(got), np.repeat(want[:, None], 2, 1))


def test_early_stop_when_all_rows_end(setup):
  model, params, prompts, mask = setup
  # A zero final norm makes every logit 0, so greedy always emits token 0: with eos_id=0 every
  # row ends at the first token and the loop must not write anything after it.
  params = dict(params, final_norm={"scale": np.zeros_like(params["final_norm"]["scale"])})
  got, steps = generate._sample(model, params, jnp.asarray(prompts), jnp.asarray(mask),
                                jax.random.PRNGKey(0), num_samples=2, max_new_tokens=4,
                                temperature=0.0, eos_id=0, pad_id=7, top_k=0)
  want = np.full((3, 2, 4), 7, np.int32)
  want[:, :, 0] = 0
  np.testing.assert_array_equal(np.asarray(got), want)
  assert int(steps) == 1  # no decoding step ran after the prefill


def test_temperature_sampling_is_deterministic_per_rng(setup):
  model, params, prompts, mask = setup
  kwargs = dict(num_samples=4, max_new_tokens=5, temperature=1.5, eos_id=None, pad_id=PAD)
  a = np.asarray(generate.sample(model, params, prompts, mask, jax.random.PRNGKey(1), **kwargs))
  b = np.asarray(generate.sample(model, params, prompts, mask, jax.random.PRNGKey(1), **kwargs))
  c = np.asarray(generate.sample(model, params, prompts, mask, jax.random.PRNGKey(2), **kwargs))
  assert a.shape == (3, 4, 5)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  assert (a[:, 0] != a[:, 1]).any()  # samples of one prompt are independent draws
  assert ((a >= 0) & (a < VOCAB)).all()
  # top_k restricts every draw to the k most likely next tokens: the first token of each row
  # is one of the top 3 of the prompt's last logits
  k = 3
  first = np.asarray(generate.sample(model, params, prompts, mask, jax.random.PRNGKey(3),
                                     num_samples=8, max_new_tokens=1, temperature=2.0,
                                     eos_id=None, pad_id=PAD, top_k=k))[:, :, 0]
  logits = np.asarray(model.apply({"params": params}, jnp.asarray(prompts),
                                  key_mask=jnp.asarray(mask))[0][:, -1])
  top = np.argsort(-logits, -1)[:, :k]
  assert all(set(first[r]) <= set(top[r]) for r in range(3))


def test_one_key_per_prompt_is_independent_of_the_batch(setup):
  """With [B] keys a prompt's samples depend on its key alone: alone, reordered or batched."""
  model, params, prompts, mask = setup
  kwargs = dict(num_samples=3, max_new_tokens=5, temperature=1.5, eos_id=None, pad_id=PAD)
  keys = jax.random.split(jax.random.key(4), 3)
  batch = np.asarray(generate.sample(model, params, prompts, mask, keys, **kwargs))
  assert (batch[:, 0] != batch[:, 1]).any()  # a prompt's samples still differ
  for r in range(3):
    alone = generate.sample(model, params, prompts[r:r + 1], mask[r:r + 1], keys[r:r + 1],
                            **kwargs)
    np.testing.assert_array_equal(np.asarray(alone)[0], batch[r])
  order = np.array([2, 0, 1])
  shuffled = generate.sample(model, params, prompts[order], mask[order], keys[order], **kwargs)
  np.testing.assert_array_equal(np.asarray(shuffled), batch[order])
  # Raw uint32 keys ([B, 2]) are the same keys.
  raw = generate.sample(model, params, prompts, mask, jax.random.key_data(keys), **kwargs)
  np.testing.assert_array_equal(np.asarray(raw), batch)
  with pytest.raises(ValueError, match="one key per prompt"):
    generate.sample(model, params, prompts, mask, keys[:2], **kwargs)


def test_rejects_bad_arguments(setup):
  model, params, prompts, mask = setup
  with pytest.raises(ValueError, match="temperature"):
    generate.sample(model, params, prompts, mask, jax.random.PRNGKey(0), num_samples=1,
                    max_new_tokens=2, temperature=-1.0, eos_id=None, pad_id=PAD)
  with pytest.raises(ValueError, match="num_samples"):
    generate.sample(model, params, prompts, mask, jax.random.PRNGKey(0), num_samples=0,
                    max_new_tokens=2, temperature=0.0, eos_id=None, pad_id=PAD)
  cfg = model.config
  flops = generate.generation_flops(cfg, 3, 5, 6)
  assert 3 * 10 * 2 * cfg.matmul_params() < flops < 2 * generate.generation_flops(cfg, 3, 5, 6 * 2)
