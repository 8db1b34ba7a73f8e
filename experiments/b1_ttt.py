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
A step unrolls 4 forwards and backwards: expect up to about 4x the B1 step
time (`python -m tools.benchmarks.benchmark_train --levels= --torch= \
--unroll b1` times k = 1..4).

Expected (not yet measured): against experiments/b1.py with
--config.loss.objective=next and the same epochs, a similar next-position
token top-1 (the teacher-forced reading, step 1) and a higher free-running
acceptance at depth (evaluate's report.md "Acceptance at depth",
metrics.json depth_acceptance.free_running); issue 32's goal on the scenes
pair is +10 points at depth 5 and 1.2x the live tau at gamma 5. The
validation loss (eval/loss) is the 4-step loss, so it is not comparable
with B1's; compare eval/next_token_top1 and the evaluation.
"""

from egpt_align.configs import base


def get_config():
  """B1, objective next, 4 unrolled steps."""
  config = base.get_config()
  config.model.name = "b1"
  config.loss.objective = "next"
  config.loss.unroll_steps = 4
  return config
