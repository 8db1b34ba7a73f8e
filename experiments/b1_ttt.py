"""B1 with multi-step ("training-time test") training: the B1 recipe with
the loss objective `next` and 4 unrolled steps (egpt_align/unroll.py).

Step j of 4 feeds the adapter the states it predicted at step j-1, with the
attention of live chain drafting (true states up to the chain's start, its
own predictions after), so it learns to stay right several tokens deep
instead of only one step ahead of the true states. Loss: the mean of the
four steps' `next` losses; fed-back states detached (as HASS's trainer).

Command:
  python -m egpt_align.train --config experiments/b1_ttt.py \
    --workdir runs/b1_ttt --config.data.train=DATA/train \
    [--config.data.val=DATA/val] [--config.lm_head=DATA/lm_head]
  python -m egpt_align.evaluate --workdir runs/b1_ttt --lm_head DATA/lm_head

Hardware: one H100 80 GB (any GPU works; bf16 compute, float32 params).
A step unrolls 4 forwards and backwards: at hidden 4096 on one H100 it took
19.77 ms against 5.13 ms for k = 1, 3.86x (docs/PERFORMANCE.md, table 1b;
`python -m tools.benchmarks.benchmark_train --levels= --torch= --unroll b1`).

Expected, as measured on the scenes pair (`gpu` preset, hidden 128;
docs/RESULTS.md, "Multi-step training"; 40 epochs, batch 64, seed 2,
trained on one H100, k = 1 on a CPU, 2026-12-07), free-running acceptance
at depth 5 on the test split, against B1 with objective next (k = 1):
37.2% [35.4, 39.3]:
  this recipe (k = 4, equal weights)            35.2% [33.4, 37.1]
  k = 4, weights (1, 0.5, 0.25, 0.125)          38.3% [36.2, 40.4]
    (--config.loss.unroll_weights='(1.0,0.5,0.25,0.125)'; on a CPU)
So k = 4 does not beat k = 1 for B1 here (issue 32's goal was +10 points;
decaying weights tie it): with equal weights the first step gets a
quarter of the loss and the chain's first draft, which every deeper one
needs, gets worse (depth 1: 79.2% against 81.8%). L5F's multi-step
recipe (experiments/l5f_ttt.py) does gain at depth: 43.2% [40.7, 45.8]
against 40.3% [38.3, 42.6]. Live (one
H100, fast runtime, gamma 5, 67 test samples of 18 scenes), B1's chain tau
is 3.53 [3.29, 3.75] against 3.59 [3.37, 3.83] for k = 1. At 10 epochs
(the adapters still improving) the same comparison read 18.0% against
24.2% at depth 5, and k = 2 or weights (1, 0.5, 0.25, 0.125)
(--config.loss.unroll_steps=2, --config.loss.unroll_weights=...) tied k = 1.
The validation loss
(eval/loss) is the k-step loss, so it is not comparable with B1's; compare
eval/next_token_top1 and the evaluation.
"""

from egpt_align.configs import base


def get_config():
  """B1, objective next, 4 unrolled steps."""
  config = base.get_config()
  config.model.name = "b1"
  config.loss.objective = "next"
  config.loss.unroll_steps = 4
  return config
