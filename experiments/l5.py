"""L5 EAGLE-style adapter: causal layer + positional table (102,819,841
params), trained with the reference objective (same-position alignment plus
next-position MSE, prediction_weight 0.5).

Command:
  python -m egpt_align.train --config experiments/l5.py \
    --workdir runs/l5 --config.data.train=DATA/train \
    [--config.data.val=DATA/val] [--config.lm_head=DATA/lm_head]

Hardware: one H100 80 GB (any GPU works; bf16 compute, float32 params).
The reference trained fp32 on one GPU; data = REFERENCE_NOTES §4 (52k train
samples, 1 s clips, 10 questions each), written by tools/dump_hidden_states.py.

Expected (the reference's reported numbers, seed doc results table):
  best val loss 1.3413, Accept@0.80/0.85/0.90/0.95 = 46.4 / 28.5 / 11.2 / 0.4%,
  cos 0.771, 50 epochs. (Accept here is the same-position reading.)
  The reference measured these on 4 % of its TEST split used as validation
  (REFERENCE_NOTES D1, D2) and selected the checkpoint on them; our numbers come
  from a real held-out split over all of it, so expect them close, not equal.

On a scenes pair (tools/scenes) add --config.model.hidden_dim=H, the
pair's hidden size (tools.study does; its results on the `gpu` pair,
hidden 128: docs/RESULTS.md). On an earlier pair of hidden 256, 10
epochs gave next-position token top-1 20.3% on its test split (one H100,
2026-11-27).
With --config.loss.objective=next (output[t] towards target[t+1] only,
the fix of REFERENCE_NOTES D8) the same recipe reached 74.0% there,
against 23.6% with the reference objective (Accept@0.90 64.0% against 0%):
CPU, 800 train / 160 val / 200 test samples of the study's pair, 40
epochs, batch 64, 2026-11-27; the scenes study trains both (l5_next).
"""

from egpt_align.configs import base


def get_config():
  """The reference recipe for L5."""
  config = base.get_config()
  config.model.name = "l5"
  return config
