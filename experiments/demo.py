"""Demo: a small L5 (EAGLE-style) adapter on built-in synthetic data.

Needs no data path: on first use the trainer writes a synthetic dataset
(egpt_align.data.synthetic: an AR(1) source and a fixed nonlinear map of the
current and previous source state as target) into WORKDIR/data/synthetic and
holds out 10 % of it for validation.

Command:
  python -m egpt_align.train --config experiments/demo.py --workdir /tmp/demo

Hardware: CPU, 2 cores, under a minute (most of it the first compile).

Expected: validation cosine rises from ~0.00 (untrained) to ~0.88 and
Accept@0.90 from 0 to ~0.40 (Accept@0.80 ~0.95); the next-position reading
(eval/next_cos_sim ~0.81) stays lower, since the next target state depends
on an unseen innovation. Curves in WORKDIR/training_curves.png.
"""

from egpt_align.configs import base


def get_config():
  """L5 at hidden 64 on 1,024 synthetic sequences, 10 epochs."""
  config = base.get_config()
  config.model.name = "l5"
  config.model.hidden_dim = 64
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
