"""L5F with multi-step ("training-time test") training: the L5F recipe with
the loss objective `next` and 4 unrolled steps (egpt_align/unroll.py).

Step j of 4 feeds the adapter's target stream the states it predicted at
step j-1, with the attention of live chain drafting; its drafter stream
stays the drafter's true states (while the drafts are right, the drafter
fed them has exactly those). Loss: the mean of the four steps' `next`
losses; fed-back states detached (as HASS's trainer).

Command:
  python -m egpt_align.train --config experiments/l5f_ttt.py \
    --workdir runs/l5f_ttt --config.data.train=DATA/train \
    [--config.data.val=DATA/val] [--config.lm_head=DATA/lm_head]
  python -m egpt_align.evaluate --workdir runs/l5f_ttt --lm_head DATA/lm_head

Hardware: one H100 80 GB (any GPU works; bf16 compute, float32 params).
A step unrolls 4 forwards and backwards: expect up to about 4x the L5F
step time (`python -m tools.benchmarks.benchmark_train --levels= --torch= \
--unroll l5f` times k = 1..4).

Expected, as measured on the scenes pair (`gpu` preset, hidden 128;
docs/RESULTS.md, "Multi-step training"; 40 epochs, batch 64, seed 2,
trained on one H100, k = 1 on a CPU, 2026-12-07), against experiments/
l5f.py with --config.loss.objective=next and the same epochs: depth 1
81.6% [80.4, 82.8] against 82.8% [81.7, 84.0], depth 5 43.2% [40.7, 45.8]
against 40.3% [38.3, 42.6] (free-running: evaluate's report.md
"Acceptance at depth", metrics.json depth_acceptance.free_running);
predicted chain tau at gamma 5: 3.99 against 3.93; live (one H100, fast
runtime, 67 test samples of 18 scenes) 3.62 [3.37, 3.93] against 3.70
[3.51, 3.92].
The validation loss
(eval/loss) is the 4-step loss, not comparable with L5F's; compare
eval/next_token_top1 and the evaluation.
"""

from egpt_align.configs import base


def get_config():
  """L5F, objective next, 4 unrolled steps."""
  config = base.get_config()
  config.model.name = "l5f"
  config.loss.objective = "next"
  config.loss.unroll_steps = 4
  return config
