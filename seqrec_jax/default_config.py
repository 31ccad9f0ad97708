"""The base experiment config every config file starts from; each field says what it does."""

from __future__ import annotations

import ml_collections

from seqrec_jax.sharding import DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
  """SASRec next-item prediction at the SRA-CL reference protocol's hyper-parameters."""
  c = ml_collections.ConfigDict()
  c.seed = 2024  # one seed fixes init, dropout masks and the data order

  c.task = ml_collections.ConfigDict()
  c.task.name = "next_item"  # next_item | sracl (see seqrec_jax/tasks.py)

  c.data = ml_collections.ConfigDict()
  c.data.format = "atomic"  # pairs | atomic (RecBole) | p5 (sequences.txt + items.tsv) | amazon
  c.data.path = ""  # file or directory; "" with atomic = ml-100k from the RecBole wheel
  c.data.name = ""  # dataset name for logs (default: from the path)
  c.data.meta_path = ""  # amazon only: meta_<Cat>.json.gz
  c.data.k_core = 5  # amazon only: iterated k-core
  c.data.max_len = 50  # input window: the last max_len items, left-padded with 0
  c.data.short_users = "train_only"  # users with < 3 items: train_only (reference) | drop

  c.model = ml_collections.ConfigDict()
  c.model.name = "sasrec"
  c.model.hidden = 64
  c.model.n_layers = 2
  c.model.n_heads = 2
  c.model.inner = 256
  c.model.dropout = 0.5  # hidden dropout
  c.model.attn_dropout = 0.5  # attention-probability dropout
  c.model.act = "gelu"
  c.model.ln_eps = 1e-12
  c.model.init_std = 0.02
  c.model.vocab_pad_multiple = 64  # item table rows rounded up (even item-axis sharding)
  c.model.dtype = "float32"  # compute dtype; params stay float32
  c.model.loss_positions = "last"  # CE at the last position (reference) | all positions
  # Softmax of the next-item loss (seqrec_jax/large_catalog.py), for catalogues of millions:
  #   full: [B, V] logits on every device (reference; fine up to ~1e5 items);
  #   sharded: the same CE, the item table sharded over the mesh's "vocab" axis and scored in
  #     blocks of softmax_chunk rows per device (memory O(B x chunk)); loss_positions="last";
  #   sampled: num_negatives shared negatives from (train count + 1) ** sampling_power with logQ
  #     correction (an estimate of the full CE at O(B x num_negatives)); loss_positions="last".
  c.model.softmax = "full"
  c.model.num_negatives = 1024  # sampled only
  c.model.sampling_power = 0.75  # sampled only: 0 = uniform, 1 = popularity
  c.model.softmax_chunk = 65536  # sharded only: item rows scored at once per device

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adam"  # adam | adamw
  c.optim.lr = 1e-3
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0  # adamw only
  c.optim.grad_clip = 0.0  # global-norm clipping; 0 = off
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"  # constant | cosine | linear (after warm-up)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 256  # global batch (all processes)
  c.train.num_steps = -1  # > 0 overrides num_epochs
  c.train.num_epochs = 200  # upper bound; early stopping usually ends sooner
  c.train.eval_every_steps = 0  # 0 = once per epoch
  c.train.log_every_steps = 50
  c.train.patience = 10  # evaluations without improvement before stopping; 0 = never stop early
  c.train.early_stop_metric = "NDCG@10"
  c.train.early_stop_mode = "max"  # max: higher is better (metrics) | min: lower is (losses)
  c.train.stop_at_step = -1  # stop (checkpointed) at this step as if preempted; -1 = off
  c.train.progress = True  # tqdm progress bar on process 0
  # Steps dispatched ahead of the last finished one (>= 1). Enough to overlap the host's input
  # work with the device; a bound keeps the progress bar, its ETA and a preemption's response
  # true to the device (0 = unbounded: the host only waits at logging steps).
  c.train.steps_in_flight = 2
  c.train.on_config_change = "error"  # resuming with changed result-affecting keys: error | allow

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 1024
  c.eval.ks = (5, 10, 20)
  c.eval.exclude_seen = False  # rank history items too (both papers do)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 0  # 0 = at every evaluation
  c.checkpoint.max_to_keep = 2
  c.checkpoint.async_save = True

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # -1 = the rest
  c.mesh.rules = DEFAULT_RULES  # logical axis -> mesh axes
  c.mesh.num_devices = -1  # use only the first N devices (single process); -1 = all
  return c


def gru4rec_model() -> ml_collections.ConfigDict:
  """GRU4Rec (RecBole-style: embedding 64, GRU 128, CE over all items)."""
  m = ml_collections.ConfigDict()
  m.name = "gru4rec"
  m.hidden = 64  # item embedding / representation width
  m.gru_hidden = 128  # GRU state width
  m.n_layers = 1
  m.dropout = 0.3  # embedding dropout
  m.init_std = 0.02
  m.vocab_pad_multiple = 64
  m.dtype = "float32"
  m.loss_positions = "last"
  return m


def bert4rec_model() -> ml_collections.ConfigDict:
  """BERT4Rec, trained by the cloze task (mask 20%, the target always masked)."""
  m = ml_collections.ConfigDict()
  m.name = "bert4rec"
  m.hidden = 64
  m.n_layers = 2
  m.n_heads = 2
  m.inner = 256
  m.dropout = 0.2  # hidden dropout
  m.attn_dropout = 0.2  # attention-probability dropout
  m.act = "gelu"
  m.ln_eps = 1e-12
  m.init_std = 0.02
  m.vocab_pad_multiple = 64  # n_items + 2 rows (padding, items, [MASK]) rounded up
  m.dtype = "float32"
  m.mask_prob = 0.2  # cloze masking probability per item (the last one is always masked)
  m.loss_positions = "last"  # unused by the cloze task; kept for the config validator
  return m


BACKBONES = ("sasrec", "gru4rec", "bert4rec")


def set_backbone(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Swaps the sequence encoder of a config: sasrec (base_config's) | gru4rec | bert4rec.

  BERT4Rec brings its own loss, the cloze task: it becomes the task (plain runs) or SRA-CL's
  L_rec (`sracl.rec_task`, when the config has an `sracl` section).
  """
  if name == "sasrec":
    return c
  if name not in BACKBONES:
    raise ValueError(f"unknown backbone {name!r}; known: {BACKBONES}")
  c.model = gru4rec_model() if name == "gru4rec" else bert4rec_model()
  if name == "bert4rec":
    if "sracl" in c and c.task.name == "sracl":
      c.sracl.rec_task = "cloze"
    else:
      c.task.name = "cloze"
  return c


def parse_arg(arg, known=("tiny",)) -> set:
  """'tiny' / 'tiny,foo' -> {'tiny', 'foo'}; checks against the known flags."""
  flags = {a.strip() for a in (arg or "").split(",") if a.strip()}
  unknown = flags - set(known)
  if unknown:
    raise ValueError(f"unknown config argument(s) {sorted(unknown)}; known: {sorted(known)}")
  return flags


def shrink_to_tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A 1-2 minute CPU run of the same pipeline: few steps, frequent evaluation."""
  c.train.num_steps = 120
  c.train.eval_every_steps = 60
  c.train.log_every_steps = 20
  c.train.batch_size = 128
  c.eval.batch_size = 512
  return c
