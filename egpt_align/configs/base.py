"""Base config: every key the trainer reads, each with what it means.

Experiments (`experiments/*.py`) import this, override a few keys and return
it. The trainer loads them with `lock_config=True`, so `--config.x=...` for a
key declared nowhere here is an error, not a silent no-op.

Optional paths and adapter overrides are `placeholder`s (typed, None when
unset). `data.train` is required for every experiment but the demo; it is a
plain placeholder rather than `required_placeholder` because ml_collections
refuses to lock a config holding an unset required placeholder, which would
make `--help`-style loading and `--config.batch_size=...` fail before the
user could pass the path. The trainer raises a clear error instead.
"""

from typing import Any

import ml_collections
from ml_collections import config_dict

# Shown in the run's log whatever their value (with every changed key).
ESSENTIAL = (
  "model.name",
  "data.train",
  "data.val",
  "batch_size",
  "num_epochs",
  "optim.learning_rate",
)


def get_config() -> ml_collections.ConfigDict:
  """The reference recipe (REFERENCE_NOTES §5) with every key declared."""
  config = ml_collections.ConfigDict()

  config.seed = 0  # init, dropout, data order and the val hold-out
  # threefry2x32 (JAX's default: the same masks on any device count) or rbg
  # (XLA's RngBitGenerator: faster; masks depend on the device count).
  config.dropout_rng_impl = "auto"  # dropout masks: rbg on GPU, else threefry
  config.batch_size = 64  # global batch (all devices); reference 64
  # Weight-update sharding (ZeRO-1, egpt_align/sharding.py): with several
  # devices, split the float32 params and AdamW moments over them, reduce-
  # scatter the gradients, update 1/n each, all-gather the bf16 kernels.
  config.shard_weight_update = True  # False: everything replicated
  config.shard_min_size = 65536  # smaller leaves (elements) stay replicated
  config.num_epochs = 50  # reference 50; also the cosine T_max
  config.early_stopping_patience = 10  # epochs w/o strict val-loss gain; 0=off
  config.log_every_steps = 50  # train metrics to host/JSONL every N steps
  config.eval_at_start = True  # validate the untrained adapter once (baseline)
  config.stop_after_steps = 0  # save and return after N global steps; 0=never
  config.tensorboard = False  # also write TensorBoard (tensorboardX only)
  config.multihost = False  # call jax.distributed.initialize() at start
  config.progress_bar = True  # tqdm bar per epoch (process 0)

  # Several processes (config.multihost; README "Several processes or
  # hosts"). Unset keys come from JAX_COORDINATOR_ADDRESS or the cluster's
  # environment (SLURM, mpirun).
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator_address = config_dict.placeholder(str)  # h:p
  config.distributed.num_processes = config_dict.placeholder(int)  # total
  config.distributed.process_id = config_dict.placeholder(int)  # this one
  # A process silent this long is declared dead: the others exit non-zero.
  config.distributed.heartbeat_timeout_s = 100  # seconds
  # SIGTERM/SIGINT on any process: the processes agree every N steps (a tiny
  # all-gather that waits for the step) and all stop at the same step. One
  # process stops at the next step whatever N is.
  config.distributed.stop_check_every_steps = 10  # N >= 1 (several processes)

  # The adapter. `name` picks it from egpt_align.models.ADAPTERS; every other
  # key that is not None is passed to create_adapter as an override, so None
  # means "the adapter's own (reference) default".
  config.model = ml_collections.ConfigDict()
  config.model.name = "l1"  # l1 l2 l3 l4 l5 b1 l5f
  config.model.dtype = "auto"  # compute dtype: auto=bf16 on GPU else fp32
  config.model.hidden_dim = config_dict.placeholder(int)  # None = from data
  config.model.bottleneck_dim = config_dict.placeholder(int)  # L1-L3
  config.model.num_blocks = config_dict.placeholder(int)  # L2, L3
  config.model.num_layers = config_dict.placeholder(int)  # L1, L4, L5, L5F
  config.model.num_heads = config_dict.placeholder(int)  # L4, L5, L5F
  config.model.ffn_dim = config_dict.placeholder(int)  # L4, L5, L5F
  config.model.dropout = config_dict.placeholder(float)  # reference 0.1
  config.model.alpha_init = config_dict.placeholder(float)  # reference 0.1
  config.model.max_seq_len = config_dict.placeholder(int)  # L5 pos table

  config.data = ml_collections.ConfigDict()
  config.data.train = config_dict.placeholder(str)  # REQUIRED dataset dir
  config.data.val = config_dict.placeholder(str)  # optional val dataset dir
  # With no data.val: hold out this fraction of train samples (fixed
  # permutation seeded by data.split_seed). A test split never goes here.
  config.data.val_fraction = 0.05  # hold-out share when data.val is unset
  config.data.split_seed = 0  # the hold-out permutation's seed
  config.data.cache = "auto"  # InputPipeline cache: auto|device|host|none
  config.data.buckets = config_dict.placeholder(tuple)  # seq-len buckets
  config.data.prefetch = 2  # batches prepared ahead
  config.data.gather_batches = 4  # device cache: batches per gather dispatch
  # Built-in synthetic pairs (the demo): written to WORKDIR/data/synthetic
  # on first use and used instead of data.train when enabled; with lm_head,
  # its LM head (WORKDIR/data/synthetic_lm_head) serves when config.lm_head
  # is unset.
  config.data.synthetic = ml_collections.ConfigDict()
  config.data.synthetic.enabled = False  # use synthetic data
  config.data.synthetic.num_samples = 512  # sequences written
  config.data.synthetic.hidden_dim = 64  # their D
  config.data.synthetic.min_len = 8  # shortest sequence
  config.data.synthetic.max_len = 32  # longest sequence
  config.data.synthetic.seed = 0  # generator seed
  config.data.synthetic.lm_head = True  # also its LM head, used as lm_head

  config.loss = ml_collections.ConfigDict()
  config.loss.objective = "reference"  # reference | next (see losses.py)
  config.loss.prediction_weight = 0.5  # L5/B1/L5F next-step MSE weight
  config.loss.cos_weight = 0.5  # weight of (1 - cos) next to the MSE
  config.loss.token_ce_weight = 0.0  # >0: + w * token CE via lm_head
  config.loss.token_ce_soft = True  # EAGLE-style soft targets (else argmax)
  # Multi-step ("training-time test") training of b1 / l5f (egpt_align/
  # unroll.py): step j feeds the adapter its step j-1 predictions, with the
  # attention of live drafting; needs objective 'next' when > 1.
  config.loss.unroll_steps = 1  # k >= 1; 1 = teacher forcing (reference)
  config.loss.unroll_weights = config_dict.placeholder(tuple)  # None: 1/k each
  config.loss.unroll_stop_gradient = True  # detach fed-back states (HASS)

  # Target LM head (NAME.npy + NAME.json, tools/extract_lm_head.py): enables
  # token top-1 agreement in validation and the token CE loss.
  config.lm_head = config_dict.placeholder(str)  # NAME[.npy|.json] or None

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 1e-3  # peak lr; reference 1e-3
  config.optim.end_learning_rate = 1e-6  # cosine floor (eta_min)
  config.optim.schedule = "cosine"  # cosine | constant
  # epoch: torch CosineAnnealingLR(T_max=num_epochs) stepped per epoch, as
  # the reference; step: per-step cosine over the run after warmup.
  config.optim.schedule_unit = "epoch"  # epoch (reference) | step
  config.optim.warmup_steps = 0  # linear warmup (schedule_unit=step only)
  config.optim.weight_decay = 0.01  # decoupled (AdamW); reference 0.01
  # all: decay every parameter (reference); matrices: skip norms, biases,
  # alphas and pos_embed.
  config.optim.decay_mask = "all"  # all (reference) | matrices
  config.optim.clip_norm = 1.0  # global grad-norm clip; 0 = off
  config.optim.b1 = 0.9  # Adam beta1 (torch default)
  config.optim.b2 = 0.999  # Adam beta2 (torch default)
  config.optim.eps = 1e-8  # Adam eps (torch default)
  # AdamW first moment's storage; bfloat16 reads and writes 4 bytes less per
  # parameter each step (the update math and second moment stay float32).
  config.optim.mu_dtype = "float32"  # float32 (reference) | bfloat16

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.enabled = True  # orbax checkpoints in WORKDIR/checkpoints
  config.checkpoint.every_steps = 0  # also save mid-epoch; 0 = epoch ends
  config.checkpoint.resume = True  # resume from WORKDIR if it has one
  config.checkpoint.async_save = True  # save in the background

  return config


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def summary(config: ml_collections.ConfigDict) -> list[str]:
  """'key: value' lines for the log: the keys whose value differs from
  get_config()'s, plus ESSENTIAL ones (the full config is config.json)."""
  base, flat = _flat(get_config().to_dict()), _flat(config.to_dict())
  return [
    f"{key}: {value!r}"
    for key, value in sorted(flat.items())
    if key in ESSENTIAL or key not in base or base[key] != value
  ]
