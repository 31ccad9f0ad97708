"""SRA-CL through the shared loop: host-side neighbour batches, all three losses, backbones."""

import json

import jax
import numpy as np
import pytest

from seqrec_jax import data as data_lib
from seqrec_jax import loop
from sracl_jax.task import default_sracl_config

from test_loop import _write_pairs, small_config  # pylint: disable=g-bad-import-order


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  root = tmp_path_factory.mktemp("sracl")
  path = _write_pairs(str(root / "toy.txt"), n_users=120, n_items=40)
  split = data_lib.leave_one_out(data_lib.load_dataset("pairs", path))
  rng = np.random.default_rng(0)
  # Precomputed semantic vectors: items on 4 topical clusters, prefixes = mean of their items.
  centres = rng.normal(size=(4, 16))
  item_vecs = centres[np.arange(40) % 4] + 0.1 * rng.normal(size=(40, 16))
  prefix_vecs = np.stack([
      item_vecs[split.dataset.items[split.dataset.offsets[u]:t] - 1].mean(0)
      for u, t in zip(split.train_users, split.train_targets)])
  np.save(root / "items.npy", item_vecs.astype(np.float32))
  np.save(root / "prefixes.npy", prefix_vecs.astype(np.float32))
  return root, path, split


def sracl_config(root, path, **sracl):
  c = small_config(path)
  c.task.name = "sracl"
  c.sracl = default_sracl_config()
  c.sracl.k = 3
  c.sracl.semantic.k = 4
  c.sracl.semantic.item_embeddings_npy = str(root / "items.npy")
  c.sracl.semantic.prefix_embeddings_npy = str(root / "prefixes.npy")
  for key, value in sracl.items():
    setattr(c.sracl, key, value)
  return c


def test_sracl_trains_all_terms_and_evaluates_backbone(toy, tmp_path):
  root, path, _ = toy
  c = sracl_config(root, path)
  results = loop.train_and_evaluate(c, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train = [r for r in rows if r["split"] == "train"]
  for key in ("rec_loss", "user_cl", "item_cl"):
    assert all(np.isfinite(r[key]) for r in train), key
  # total = rec + 0.1 user + 0.1 item (per-step means; allow averaging differences)
  r = train[-1]
  assert r["loss"] == pytest.approx(r["rec_loss"] + 0.1 * r["user_cl"] + 0.1 * r["item_cl"],
                                    rel=0.05)
  assert results["test"]["HR@10"] > 0.3  # the ring structure is still learnt
  assert (tmp_path / "semantic" / "stats.json").exists()


def test_sracl_host_batch_neighbour_windows(toy, tmp_path):
  root, path, split = toy
  c = sracl_config(root, path)
  exp = loop.build_experiment(c, workdir=str(tmp_path))
  task = exp.task
  batch = task.host_batch(next(exp.iterator))
  b, k, length = batch["nbr_inputs"].shape
  assert (k, length) == (3, 8)
  ds = split.dataset
  for row in range(4):
    ex = batch["examples"][row]
    nbrs = task._prefix_nbrs[ex]  # pylint: disable=protected-access
    assert ex not in nbrs  # self excluded
    for j, n in enumerate(nbrs):
      u, t = split.train_users[n], split.train_targets[n]
      seq = ds.items[ds.offsets[u]:t][-length:]
      want = np.concatenate([np.zeros(length - len(seq), np.int32), seq])
      np.testing.assert_array_equal(batch["nbr_inputs"][row, j], want)
    np.testing.assert_allclose(batch["user_sem"][row], np.load(root / "prefixes.npy")[ex])
  # The synthesizer is part of the trained state; evaluation sees only the backbone.
  assert set(exp.state.params) == {"backbone", "synthesizer"}


@pytest.mark.parametrize("alpha,beta", [(0.0, 0.1), (0.1, 0.0)])
def test_sracl_single_terms(toy, tmp_path, alpha, beta):
  root, path, _ = toy
  c = sracl_config(root, path, alpha=alpha, beta=beta)
  c.train.num_steps = 10
  c.train.eval_every_steps = 10
  loop.train_and_evaluate(c, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if '"train"' in l]
  assert ("user_cl" in rows[-1]) == bool(alpha) and ("item_cl" in rows[-1]) == bool(beta)


def test_sracl_on_gru4rec_backbone(toy, tmp_path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  root, path, _ = toy
  spec = importlib.util.spec_from_file_location(
      "g", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "configs", "gru4rec", "ml100k.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = sracl_config(root, path)
  c.model = mod.gru4rec_model()
  c.model.hidden, c.model.gru_hidden, c.model.vocab_pad_multiple = 16, 16, 8
  c.train.num_steps = 10
  c.train.eval_every_steps = 10
  results = loop.train_and_evaluate(c, str(tmp_path))
  assert np.isfinite(results["test"]["NDCG@10"])


def test_sracl_on_bert4rec_with_cloze_rec_term(toy, tmp_path):
  root, path, _ = toy
  c = _bert4rec_sracl_config(root, path)
  c.train.num_steps = 10
  c.train.eval_every_steps = 10
  results = loop.train_and_evaluate(c, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if '"train"' in l]
  assert np.isfinite(rows[-1]["user_cl"]) and np.isfinite(rows[-1]["item_cl"])
  assert np.isfinite(results["test"]["NDCG@10"])


def _bert4rec_sracl_config(root, path, **sracl):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "b", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "configs", "bert4rec", "ml100k.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = sracl_config(root, path, rec_task="cloze", **sracl)
  c.model = mod.bert4rec_model()
  c.model.hidden, c.model.inner, c.model.n_layers, c.model.vocab_pad_multiple = 16, 32, 1, 8
  return c


def test_sracl_cloze_rec_term_picks_its_scoring_outside_the_grad(toy, tmp_path):
  """SRA-CL on BERT4Rec: the train step picks the cloze L_rec's gathered or dense scoring outside
  the gradient. Gathered scoring (the planned budget) and dense scoring (a budget of 8 rows:
  overflow) give one step (dropout off). With length buckets the two choices combine into four
  losses, index = 2 * bucket choice + cloze choice (checked without compiling them)."""
  root, path, _ = toy
  got = {}
  for case in ("planned", "overflow"):
    c = _bert4rec_sracl_config(root, path, synth_dropout=0.0, length_buckets=0)
    c.model.dropout = c.model.attn_dropout = 0.0
    exp = loop.build_experiment(c, workdir=str(tmp_path / case))
    host = next(exp.iterator)
    b, length = host["target_seq"].shape
    assert exp.task.base.scoring_rows(b) < b * length
    if case == "overflow":
      exp.task.base._budgets[b] = 8  # pylint: disable=protected-access
    index, losses = exp.task.select_loss(exp.task.host_batch(host), jax.random.key(0))
    assert len(losses) == 2 and int(index) == (case == "overflow"), (case, int(index))
    state, metrics = exp.train_step(exp.state, host)
    got[case] = (jax.device_get(state.params), {k: float(v) for k, v in metrics.items()})
    # The same task with length buckets: four losses, for a plan every batch fits (one width,
    # the full one) and for one this batch cannot fit (all but one row at width 1).
    from seqrec_jax import buckets  # pylint: disable=g-import-not-at-top
    exp.task.length_buckets = 3
    rows = exp.task.bucket_plan(b).rows
    for plan, bucket_choice in ((buckets.Plan((length,), (rows,)), 0),
                                (buckets.Plan((1, length), (rows - 1, 1)), 1)):
      exp.task._plans[b] = plan  # pylint: disable=protected-access
      index, losses = exp.task.select_loss(exp.task.host_batch(host), jax.random.key(0))
      assert len(losses) == 4 and int(index) == 2 * bucket_choice + (case == "overflow"), (
          case, plan, int(index))
      assert [(l.keywords["mode"], l.keywords["rec_mode"]) for l in losses] == [
          ("bucketed", "gathered"), ("bucketed", "dense"), ("passes", "gathered"),
          ("passes", "dense")]
  assert got["planned"][1]["cloze_overflow"] == 0.0 and got["overflow"][1]["cloze_overflow"] == 1.0
  np.testing.assert_allclose(got["planned"][1]["loss_sum"], got["overflow"][1]["loss_sum"],
                             rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got["planned"][0]), jax.tree.leaves(got["overflow"][0])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rec_task", ["next_item", "cloze"])
def test_which_passes_join_the_length_buckets(toy, tmp_path, rec_task):
  """L_rec's pass joins the bucketed call for next-item CE at the last position (1 + 1 + k + 2
  rows per example); the cloze loss and the all-positions CE, which read every position, keep
  their own pass (1 + k + 2)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  root, path, _ = toy
  c = sracl_config(root, path, rec_task=rec_task, length_buckets=3)
  if rec_task == "cloze":
    spec = importlib.util.spec_from_file_location(
        "b", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs", "bert4rec", "ml100k.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c.model = mod.bert4rec_model()
    c.model.hidden, c.model.inner, c.model.n_layers, c.model.vocab_pad_multiple = 16, 32, 1, 8
  task, _, batch = _task_params_batch(c, tmp_path / rec_task)
  b, k = batch["inputs"].shape[0], c.sracl.k
  with_rec = rec_task == "next_item"
  assert task.bucket_plan(b).rows == (1 + k + 2 + with_rec) * b
  assert task._rows_need(batch).shape == ((1 + k + 2 + with_rec) * b,)  # pylint: disable=protected-access
  if with_rec:
    c.model.loss_positions = "all"
    task, _, _ = _task_params_batch(c, tmp_path / "all")
    assert task.bucket_plan(b).rows == (1 + k + 2) * b


def test_backbone_alone_arm_buckets_its_rec_pass(toy, tmp_path):
  """The w/o-CL arm (alpha = beta = 0) buckets L_rec's pass alone: same loss and gradients as
  the plain next-item loss (dropout off), and the train step takes the bucketed branch."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from seqrec_jax import buckets  # pylint: disable=g-import-not-at-top
  from seqrec_jax import tasks  # pylint: disable=g-import-not-at-top
  root, path, _ = toy
  c = sracl_config(root, path, alpha=0.0, beta=0.0, length_buckets=3)
  c.model.dropout = 0.0
  c.model.attn_dropout = 0.0
  task, params, batch = _task_params_batch(c, tmp_path)
  b = batch["inputs"].shape[0]
  need = np.asarray(buckets.required_widths(batch["inputs"], 0))
  plan = buckets.make_plan(need[None], c.data.max_len, 3, n_std=0.0)
  assert plan.rows == task.bucket_plan(b).rows == b and plan.cost_fraction() < 1.0
  task._plans[b] = plan  # pylint: disable=protected-access
  index, (bucketed, _) = task.select_loss(batch)
  assert int(index) == 0

  def plain(p):
    total, w = tasks.next_item_loss(p["backbone"], batch, jax.random.key(0), model=task.model)
    return total / w

  def ours(p):
    total, w, m = bucketed(p, batch, {}, jax.random.key(5))
    return total / w, m
  want, want_grads = jax.value_and_grad(plain)(params)
  (got, metrics), got_grads = jax.value_and_grad(ours, has_aux=True)(params)
  assert set(metrics) == {"rec_loss", "bucket_overflow"} and float(metrics["bucket_overflow"]) == 0
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for a, w in zip(jax.tree.leaves(got_grads["backbone"]), jax.tree.leaves(want_grads["backbone"])):
    np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-6)
  assert not jnp.any(jnp.stack([jnp.abs(g).sum() for g in jax.tree.leaves(
      got_grads["synthesizer"])]))  # unused without L_CS


def _task_params_batch(c, tmp_path):
  """The task, its initial parameters (host) and the first training batch (device arrays)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  exp = loop.build_experiment(c, workdir=str(tmp_path))
  host = exp.task.host_batch(next(exp.iterator))
  return (exp.task, jax.device_get(exp.state.params),
          {k: jnp.asarray(host[k]) for k in exp.task.train_fields})


@pytest.mark.parametrize("length_buckets", [0, 3])
def test_sracl_loss_equals_separate_encoder_passes(toy, tmp_path, length_buckets):
  """The task's loss is the reference's composition of its encoder passes.

  Dropout off everywhere, so every pass is deterministic: the task's loss must equal L_rec +
  alpha NT-Xent(prefix, synthesized positive) + beta NT-Xent(view 1, view 2) computed here with
  one encoder call per piece, the views drawn with the same substitution keys. With length
  buckets the passes run as one sorted, width-bucketed call: the same loss.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sracl_jax import augment, losses  # pylint: disable=g-import-not-at-top
  root, path, _ = toy
  c = sracl_config(root, path, synth_dropout=0.0, alpha=0.3, beta=0.2,
                   length_buckets=length_buckets)
  c.model.dropout = 0.0
  c.model.attn_dropout = 0.0
  task, params, batch = _task_params_batch(c, tmp_path)
  if length_buckets:
    _plan_from_the_batch(task, batch, c)
  consts = {k: jnp.asarray(v) for k, v in task.consts.items()}
  rng = jax.random.key(7)
  total_sum, weight_sum, metrics = task.loss(params, batch, consts, rng)

  backbone = params["backbone"]
  def encode(x):
    return np.asarray(task.model.apply({"params": backbone}, x, train=False))
  rngs = jax.random.split(rng, 7)
  rec_sum, w, _ = task.base.loss(backbone, batch, {}, rngs[0])
  b, k, length = batch["nbr_inputs"].shape
  h_user = encode(batch["inputs"])
  h_nbrs = encode(batch["nbr_inputs"].reshape(b * k, length)).reshape(b, k, -1)
  positive = task.synthesizer.apply({"params": params["synthesizer"]}, batch["user_sem"],
                                    batch["nbr_sem"], jnp.asarray(h_nbrs), train=False)
  cs_sum, cs_w = losses.nt_xent(jnp.asarray(h_user), positive, batch["weights"],
                                c.sracl.temperature, c.sracl.similarity)
  table = consts["item_neighbours"]
  v1 = augment.substitute(rngs[4], batch["inputs"], table, c.sracl.sub_prob)
  v2 = augment.substitute(rngs[5], batch["inputs"], table, c.sracl.sub_prob)
  assert not np.array_equal(v1, v2)  # the substitution did change the views
  is_sum, is_w = losses.nt_xent(jnp.asarray(encode(v1)), jnp.asarray(encode(v2)),
                                batch["weights"], c.sracl.temperature, c.sracl.similarity)
  w = float(w)
  user_cl = float(cs_sum) / max(float(cs_w), 1.0)
  item_cl = float(is_sum) / max(float(is_w), 1.0)
  want = float(rec_sum) / max(w, 1.0) + 0.3 * user_cl + 0.2 * item_cl
  assert float(weight_sum) == w
  np.testing.assert_allclose(float(metrics["user_cl"]), user_cl, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["item_cl"]), item_cl, rtol=1e-5)
  np.testing.assert_allclose(float(total_sum) / w, want, rtol=1e-5)
  if length_buckets:
    assert float(metrics["bucket_overflow"]) == 0.0  # the bucketed branch ran


def _plan_from_the_batch(task, batch, c):
  """Plans this batch's own widths (so the bucketed branch, not the fallback, runs); the task's
  sampled plan for the batch size must also be a real multi-width plan."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from seqrec_jax import buckets  # pylint: disable=g-import-not-at-top
  b = batch["inputs"].shape[0]
  sampled = task.bucket_plan(b)
  assert len(sampled.widths) > 1 and sampled.cost_fraction() < 1.0, sampled
  # L_rec's pass (next-item CE here), then L_CS's prefix and neighbours, then the two views
  # (they keep the prefix's spans).
  rows = jnp.concatenate([batch["inputs"], batch["inputs"],
                          batch["nbr_inputs"].reshape(-1, c.data.max_len),
                          batch["inputs"], batch["inputs"]])
  need = np.asarray(buckets.required_widths(rows, buckets.truncation_slack(task.model)))
  plan = buckets.make_plan(need[None], c.data.max_len, task.length_buckets, n_std=0.0)
  assert plan.rows == sampled.rows and len(plan.widths) > 1
  task._plans[b] = plan  # pylint: disable=protected-access


def _plan_one_batch_overflows(task, batches, c):
  """Plans one batch's own widths such that another of `batches` (task batches) overflows the
  plan; returns (index of the batch that fits, index of the first that does not). One plan, so
  one compiled program takes both the bucketed and the per-pass branch."""
  for fits, batch in enumerate(batches):
    _plan_from_the_batch(task, batch, c)
    choices = [int(task.select_loss(b)[0]) for b in batches]
    if 1 in choices:
      assert choices[fits] == 0
      return fits, choices.index(1)
  raise AssertionError(f"each of the {len(batches)} batches' plans fits all of them")


def _deterministic_config(root, path, n):
  """Dropout off everywhere; length buckets n (0 = per pass)."""
  c = sracl_config(root, path, synth_dropout=0.0, length_buckets=n)
  c.model.dropout = 0.0
  c.model.attn_dropout = 0.0
  return c


def test_length_buckets_give_the_same_gradients(toy, tmp_path):
  """Dropout off: the bucketed loss (`task.loss`, which checks the plan with a differentiated
  lax.cond) has the per-pass loss's value and gradients, both for a batch that fits the plan and
  for one too long for it (the full-width fallback, flagged). One plan, one compile, two batches."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  root, path, _ = toy
  c = _deterministic_config(root, path, 4)
  exp = loop.build_experiment(c, workdir=str(tmp_path / "4"))
  ref, params, _ = _task_params_batch(_deterministic_config(root, path, 0), tmp_path / "0")
  task = exp.task
  batches = []
  for _ in range(8):
    host = task.host_batch(next(exp.iterator))
    batches.append({k: jnp.asarray(host[k]) for k in task.train_fields})
  fits, over = _plan_one_batch_overflows(task, batches, c)

  def value_and_grads(t):
    consts = {k: jnp.asarray(v) for k, v in t.consts.items()}
    def f(p, batch):
      total, w, m = t.loss(p, batch, consts, jax.random.key(3))
      return total / w, m
    return jax.jit(jax.value_and_grad(f, has_aux=True))
  ours, theirs = value_and_grads(task), value_and_grads(ref)
  for name, i in (("fits", fits), ("overflow", over)):
    (value, metrics), grads = ours(params, batches[i])
    (want, want_metrics), want_grads = theirs(params, batches[i])
    assert "bucket_overflow" not in want_metrics
    assert float(metrics["bucket_overflow"]) == (name == "overflow"), name
    np.testing.assert_allclose(float(value), float(want), rtol=1e-5, err_msg=name)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=name)


def test_train_step_selects_the_bucketed_gradient_outside_the_grad(toy, tmp_path):
  """The shared train step asks the task which loss to differentiate (`select_loss`). Under one
  plan (batch A's own widths), batch A fits and takes the bucketed gradient, and a batch B with
  more long rows takes the per-pass one. Either step from the same state gives the parameters of
  the per-pass step (length buckets off; dropout off). One compiled step serves both batches."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  root, path, _ = toy
  ref = loop.build_experiment(_deterministic_config(root, path, 0), workdir=str(tmp_path / "0"))
  c = _deterministic_config(root, path, 4)
  exp = loop.build_experiment(c, workdir=str(tmp_path / "4"))
  hosts = [next(exp.iterator) for _ in range(8)]
  fits, over = _plan_one_batch_overflows(exp.task, [exp.task.host_batch(h) for h in hosts], c)
  for name, i in (("fits", fits), ("overflow", over)):
    want_state, want = ref.train_step(jax.tree.map(jnp.copy, ref.state), hosts[i])
    state, got = exp.train_step(jax.tree.map(jnp.copy, exp.state), hosts[i])
    assert "bucket_overflow" not in want
    assert float(got["bucket_overflow"]) == (name == "overflow"), name
    np.testing.assert_allclose(float(got["loss_sum"]), float(want["loss_sum"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                    jax.tree.leaves(jax.device_get(want_state.params))):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)


def test_length_buckets_auto_and_bad_value(toy, tmp_path):
  root, path, _ = toy
  task, _, _ = _task_params_batch(sracl_config(root, path), tmp_path / "auto")
  want = 4 if (jax.default_backend() == "cpu" and jax.device_count() == 1) else 0
  assert task.length_buckets == want
  with pytest.raises(ValueError, match="config.sracl.length_buckets=-2"):
    _task_params_batch(sracl_config(root, path, length_buckets=-2), tmp_path / "bad")


def test_mean_synthesizer_ablation_is_the_plain_neighbour_mean(toy, tmp_path):
  """synthesizer="mean": L_CS contrasts the prefix with the unweighted mean of its neighbours."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sracl_jax import losses  # pylint: disable=g-import-not-at-top
  root, path, _ = toy
  c = sracl_config(root, path, synthesizer="mean", alpha=0.5, beta=0.0)
  c.model.dropout = 0.0
  c.model.attn_dropout = 0.0
  task, params, batch = _task_params_batch(c, tmp_path)
  _, _, metrics = task.loss(params, batch, {}, jax.random.key(3))
  b, k, length = batch["nbr_inputs"].shape
  encode = lambda x: np.asarray(task.model.apply({"params": params["backbone"]}, x, train=False))
  h_nbrs = encode(batch["nbr_inputs"].reshape(b * k, length)).reshape(b, k, -1)
  cs_sum, cs_w = losses.nt_xent(jnp.asarray(encode(batch["inputs"])),
                                jnp.asarray(h_nbrs.sum(1) / k), batch["weights"],
                                c.sracl.temperature, c.sracl.similarity)
  np.testing.assert_allclose(float(metrics["user_cl"]), float(cs_sum) / max(float(cs_w), 1.0),
                             rtol=1e-5)
  # The learned synthesizer would give another value (its weights are not uniform).
  positive = task.synthesizer.apply({"params": params["synthesizer"]}, batch["user_sem"],
                                    batch["nbr_sem"], jnp.asarray(h_nbrs), train=False)
  assert not np.allclose(np.asarray(positive), h_nbrs.mean(1), atol=1e-4)


def test_random_neighbours_table():
  from sracl_jax.task import random_neighbours  # pylint: disable=g-import-not-at-top
  t = random_neighbours(50, 10, np.random.default_rng(0))
  assert t.shape == (50, 10) and t.dtype == np.int32
  assert t.min() >= 0 and t.max() < 50
  assert not (t == np.arange(50)[:, None]).any()  # never itself
  assert all(len(set(row)) == 10 for row in t)  # distinct within a row
  # Nearly saturated (k = n - 1) still works: each row is every other index.
  full = random_neighbours(6, 5, np.random.default_rng(1))
  for i, row in enumerate(full):
    assert sorted(row) == [j for j in range(6) if j != i]
  # Uniform over the others: every index is drawn about equally often.
  counts = np.bincount(random_neighbours(2000, 10, np.random.default_rng(2)).ravel(),
                       minlength=2000)
  assert counts.min() > 0 and counts.max() < 30  # mean 10
  np.testing.assert_array_equal(random_neighbours(50, 10, np.random.default_rng(0)), t)
  with pytest.raises(ValueError, match="at least 11 rows"):
    random_neighbours(10, 10, np.random.default_rng(0))


@pytest.mark.parametrize("mode", ["random", "random_users", "random_items"])
def test_random_neighbour_ablations_replace_the_tables(toy, tmp_path, mode):
  root, path, split = toy
  sem = loop.build_experiment(sracl_config(root, path), workdir=str(tmp_path / "s")).task
  c = sracl_config(root, path, neighbours=mode)
  c.sracl.semantic_dir = str(tmp_path / "s" / "semantic")  # the same semantic tables
  task = loop.build_experiment(c, workdir=str(tmp_path / "r")).task
  # pylint: disable=protected-access
  users_random = mode in ("random", "random_users")
  items_random = mode in ("random", "random_items")
  assert np.array_equal(task._prefix_nbrs, sem._prefix_nbrs) != users_random
  assert np.array_equal(task.consts["item_neighbours"], sem.consts["item_neighbours"]) != items_random
  n_train, n_items = len(split.train_targets), split.dataset.n_items
  assert not (task._prefix_nbrs == np.arange(n_train)[:, None]).any()
  items = task.consts["item_neighbours"]
  assert (items[0] == 0).all() and items[1:].min() >= 1 and items[1:].max() <= n_items
  assert not (items[1:] == np.arange(1, n_items + 1)[:, None]).any()
  if items_random:
    # Random retrieval ignores the semantic clusters (items i and i + 4 share one); the semantic
    # table keeps mostly same-cluster neighbours.
    same = lambda t: np.mean((t[1:] - np.arange(1, n_items + 1)[:, None]) % 4 == 0)
    assert same(sem.consts["item_neighbours"]) > 0.9 and same(items) < 0.5


def test_bad_ablation_setting_is_a_clear_error(toy, tmp_path):
  root, path, _ = toy
  with pytest.raises(ValueError, match="config.sracl.synthesizer='attn'"):
    loop.build_experiment(sracl_config(root, path, synthesizer="attn"), workdir=str(tmp_path))
  with pytest.raises(ValueError, match="config.sracl.neighbours='nearest'"):
    loop.build_experiment(sracl_config(root, path, neighbours="nearest"), workdir=str(tmp_path))
