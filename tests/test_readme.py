"""The README's pipeline chain (steps 1-5), run exactly as written.

The commands are read from the fenced bash blocks of README.md's section
"The pipeline, step by step", not copied here; only /tmp/ is redirected into
the test's own directory. Examples beside the chain (e.g. the multi-process
launcher) are fenced `sh`, so they are shown but not run here.
"""

import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## The pipeline, step by step"


def readme_blocks(text: str) -> list[str]:
  """The ```bash blocks of the pipeline section, in order."""
  start = text.index(SECTION)
  end = text.find("\n## ", start + len(SECTION))
  section = text[start : end if end >= 0 else len(text)]
  return re.findall(r"^```bash\n(.*?)^```$", section, re.S | re.M)


def test_readme_blocks_are_found():
  with open(os.path.join(REPO, "README.md")) as f:
    blocks = readme_blocks(f.read())
  assert len(blocks) == 5  # one per step
  assert "tools.dump_hidden_states" in blocks[0]
  assert "tools.benchmark_sd" in blocks[4]


def test_readme_pipeline_chain_runs(tmp_path):
  with open(os.path.join(REPO, "README.md")) as f:
    blocks = readme_blocks(f.read())
  env = dict(os.environ)
  # `python` in the README is this interpreter.
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  env["EGPT_ALIGN_TRACEBACK"] = "1"  # a failure here shows its traceback
  for step, block in enumerate(blocks, 1):
    script = block.replace("/tmp/", f"{tmp_path}/")
    proc = subprocess.run(
      ["bash", "-euo", "pipefail", "-c", script],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert proc.returncode == 0, (
      f"README step {step} failed:\n{script}\n{proc.stderr[-4000:]}"
    )
  toy = tmp_path / "toy"
  # Step 2 trained on step 1's dataset, with step 1's LM head.
  config = json.loads((toy / "run" / "config.json").read_text())
  assert config["data"]["train"] == str(toy / "ds")
  assert config["lm_head"] == str(toy / "lm_head")
  assert not config["data"]["synthetic"]["enabled"]
  # Step 5 benchmarked the adapter of step 2's kind, and evaluate read the
  # measured costs at the benchmark's gamma.
  bench = json.loads((toy / "bench_sd" / "results.json").read_text())
  assert config["model"]["name"] == "l5"
  assert "l5" in bench["costs"]["draft_ms_per_token"]
  metrics = json.loads(
    (toy / "run" / "eval_ds_holdout" / "metrics.json").read_text()
  )
  costs = metrics["settings"]["costs"]
  assert costs["source"].endswith("results.json")
  assert costs["draft_key"] == "l5" and "note" not in costs
  assert metrics["settings"]["gamma"] == bench["costs"]["gamma"]
