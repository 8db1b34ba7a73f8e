"""The README's pipeline chain (steps 1-5), run exactly as written.

The commands are read from the fenced bash blocks of README.md's section
"The pipeline, step by step", not copied here; only /tmp/ is redirected into
the test's own directory. Examples beside the chain (e.g. the multi-process
launcher) are fenced `sh`, so they are shown but not run here. One test per
step; each runs the steps before it first unless an earlier test did (one
worker runs this module: pyproject's --dist loadgroup).
"""

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## The pipeline, step by step"

pytestmark = pytest.mark.xdist_group("readme")


def readme_blocks(text: str) -> list[str]:
  """The ```bash blocks of the pipeline section, in order."""
  start = text.index(SECTION)
  end = text.find("\n## ", start + len(SECTION))
  section = text[start : end if end >= 0 else len(text)]
  return re.findall(r"^```bash\n(.*?)^```$", section, re.S | re.M)


def _blocks() -> list[str]:
  with open(os.path.join(REPO, "README.md")) as f:
    return readme_blocks(f.read())


def test_readme_blocks_are_found():
  blocks = _blocks()
  assert len(blocks) == 5  # one per step
  assert "tools.dump_hidden_states" in blocks[0]
  assert "tools.benchmark_sd" in blocks[4]


class _Chain:
  """Runs the README's steps in order, each once, in one directory."""

  def __init__(self, tmp_path):
    self.tmp = tmp_path
    self.blocks = _blocks()
    self.done = 0
    self.failed = None
    self.env = dict(os.environ)
    # `python` in the README is this interpreter.
    path = os.path.dirname(sys.executable) + os.pathsep + self.env["PATH"]
    self.env["PATH"] = path
    self.env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    self.env["EGPT_ALIGN_TRACEBACK"] = "1"  # a failure shows its traceback

  def through(self, step: int) -> str:
    """Runs steps up to `step` (1-based); returns the toy directory."""
    while self.done < step:
      if self.failed:
        pytest.fail(f"an earlier README step failed: {self.failed}")
      script = self.blocks[self.done].replace("/tmp/", f"{self.tmp}/")
      proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=REPO,
        env=self.env,
        capture_output=True,
        text=True,
        timeout=600,
      )
      self.done += 1
      if proc.returncode:
        self.failed = f"step {self.done}"
        pytest.fail(
          f"README step {self.done} failed:\n{script}\n{proc.stderr[-4000:]}"
        )
    return self.tmp / "toy"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  return _Chain(tmp_path_factory.mktemp("readme"))


def test_step_1_dump_and_lm_head(chain):
  toy = chain.through(1)
  header = json.loads((toy / "ds" / "header.json").read_text())
  assert header["num_samples"] == 24
  assert (toy / "lm_head.npy").exists()


def test_step_2_train_on_step_1s_dataset(chain):
  toy = chain.through(2)
  # Step 2 trained on step 1's dataset, with step 1's LM head.
  config = json.loads((toy / "run" / "config.json").read_text())
  assert config["data"]["train"] == str(toy / "ds")
  assert config["lm_head"] == str(toy / "lm_head")
  assert not config["data"]["synthetic"]["enabled"]
  assert config["model"]["name"] == "l5"


def test_step_3_evaluate(chain):
  toy = chain.through(3)
  metrics = toy / "run" / "eval_ds_holdout" / "metrics.json"
  assert json.loads(metrics.read_text())["run"]["adapter"] == "l5"


def test_step_4_export(chain):
  toy = chain.through(4)
  assert (toy / "export" / "l5.pt").stat().st_size > 0


def test_step_5_benchmark_and_rescore(chain):
  toy = chain.through(5)
  # Step 5 benchmarked the adapter of step 2's kind, and evaluate read the
  # measured costs at the benchmark's gamma.
  bench = json.loads((toy / "bench_sd" / "results.json").read_text())
  assert "l5" in bench["costs"]["draft_ms_per_token"]
  metrics = json.loads(
    (toy / "run" / "eval_ds_holdout" / "metrics.json").read_text()
  )
  costs = metrics["settings"]["costs"]
  assert costs["source"].endswith("results.json")
  assert costs["draft_key"] == "l5" and "note" not in costs
  assert metrics["settings"]["gamma"] == bench["costs"]["gamma"]
