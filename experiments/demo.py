"""Demo: a small L5 (EAGLE-style) adapter on built-in synthetic data.

Needs no data path: unless --config.data.train=DIR is given (then that
dataset is used, and the model's hidden size is the data's), on first use
the trainer writes a synthetic dataset
(egpt_align.data.synthetic: an AR(1) source and a fixed nonlinear map of the
current and previous source state as target) into WORKDIR/data/synthetic,
plus its LM head (WORKDIR/data/synthetic_lm_head, vocabulary 256) for token
metrics, and holds out 10 % of the sequences for validation.

Command:
  python -m egpt_align.train --config experiments/demo.py --workdir /tmp/demo

Hardware: CPU, 2 cores: about 25 s (most of it compiling), no GPU needed.

Expected (untrained -> trained, validation over the whole hold-out; the
same-position reading, output[t] vs target[t]):
  cosine 0.00 -> 0.885, Accept@0.90 0.00 -> 0.40 (Accept@0.80 ~0.95),
  token top-1 agreement 0.01 -> 0.39, val loss 2.24 -> 0.316.
  The next-position reading stays lower (eval/next_cos_sim ~0.81, next token
  top-1 ~0.29): the next target state depends on an unseen innovation.
  Curves in WORKDIR/training_curves.png.
"""

from egpt_align.configs import base


def get_config():
  """L5 at hidden 64 on 1,024 synthetic sequences, 10 epochs."""
  config = base.get_config()
  config.model.name = "l5"
  # hidden_dim stays None: taken from the data (64 for the built-in data).
  config.model.num_heads = 4
  config.model.ffn_dim = 128
  config.model.max_seq_len = 64
  config.data.synthetic.enabled = True
  config.data.synthetic.num_samples = 1024
  config.data.synthetic.hidden_dim = 64
  config.data.synthetic.min_len = 8
  config.data.synthetic.max_len = 32
  config.data.val_fraction = 0.1
  config.data.buckets = (32,)  # one shape: one compile (CPU compiles are slow)
  config.batch_size = 16
  config.num_epochs = 10
  config.log_every_steps = 10
  # Synthetic source and target start unrelated (cosine ~0), unlike real
  # drafter/target states, so the residual adapter needs a larger step.
  config.optim.learning_rate = 1e-2
  return config
