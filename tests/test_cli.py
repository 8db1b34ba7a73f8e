"""Every command line: a bad input is one line on stderr and exit status 2."""

import json
import os
import subprocess
import sys

import pytest

from egpt_align import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "experiments", "demo.py")


def _run(*args, env=None):
  full_env = dict(os.environ)
  full_env.pop("EGPT_ALIGN_TRACEBACK", None)
  full_env.update(env or {})
  return subprocess.run(
    [sys.executable, *args],
    cwd=REPO,
    env=full_env,
    capture_output=True,
    text=True,
    timeout=120,
  )


def _assert_one_line_error(proc, *fragments):
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  errors = [line for line in lines if line.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-2000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]


@pytest.mark.parametrize(
  "override, fragments",
  [
    ("--config.batch_sise=3", ("'batch_sise'", 'did you mean "batch_size"')),
    (
      "--config.optim.lr_typo=1",
      ("'optim.lr_typo'", 'did you mean "optim.learning_rate"'),
    ),
    ("--config.data.xx=1", ("'data.xx'", "config.data has buckets, cache")),
    ("--config.model.name=l9", ("config.model.name", "'l9'", "'l5f'")),
    ("--config.batch_size=abc", ("--config.batch_size=abc", "abc")),
    ("--config.data.train=/no/such/dir", ("config.data.train=/no/such/dir",)),
  ],
)
def test_train_user_errors(tmp_path, override, fragments):
  workdir = tmp_path / "run"
  proc = _run(
    "-m", "egpt_align.train", "--config", DEMO, "--workdir", str(workdir),
    override,
  )  # fmt: skip
  _assert_one_line_error(proc, *fragments)
  # Refused before anything is written (the demo's synthetic data first).
  assert not workdir.exists()


def test_train_refuses_a_workdir_in_use(tmp_path):
  from egpt_align import workdir

  with workdir.owned(str(tmp_path)):
    proc = _run(
      "-m", "egpt_align.train", "--config", DEMO, "--workdir", str(tmp_path),
    )  # fmt: skip
  _assert_one_line_error(
    proc, f"{tmp_path} is in use by another training run (pid {os.getpid()}"
  )
  assert os.listdir(tmp_path) == [workdir.LOCK_FILE]  # nothing written


@pytest.mark.parametrize("override", [(), ("--config.batch_size=8",)])
def test_train_missing_config_file(tmp_path, override):
  proc = _run(
    "-m", "egpt_align.train", "--config", str(tmp_path / "nope.py"),
    "--workdir", str(tmp_path), *override,
  )  # fmt: skip
  _assert_one_line_error(proc, "--config", "nope.py")


def test_evaluate_user_errors(tmp_path):
  proc = _run("-m", "egpt_align.evaluate", "--workdir", str(tmp_path))
  _assert_one_line_error(proc, str(tmp_path), "a training workdir?")
  proc = _run("-m", "egpt_align.evaluate")
  _assert_one_line_error(proc, "give exactly one of --workdir")


def test_evaluate_params_of_another_adapter(tmp_path):
  """L5 weights under a config naming l4: one line naming both, exit 2."""
  import jax
  import numpy as np

  from egpt_align import checkpoint, models
  from egpt_align.data import synthetic

  data = synthetic.write_synthetic_dataset(
    str(tmp_path / "ds"), 4, hidden_dim=16, min_len=2, max_len=4
  )
  dims = {"hidden_dim": 16, "num_heads": 2, "ffn_dim": 32}
  model = models.create_adapter("l5", max_seq_len=8, **dims)
  x = np.zeros((1, 4, 16), np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  npz = str(tmp_path / "l5.npz")
  checkpoint.save_params_npz(npz, params)
  (tmp_path / "l5.config.json").write_text(
    json.dumps({"model": {"name": "l4", **dims}})
  )
  proc = _run(
    "-m", "egpt_align.evaluate", "--params", npz, "--data", data,
    "--out", str(tmp_path / "out"),
  )  # fmt: skip
  _assert_one_line_error(
    proc, f"--params {npz} (adapter 'l4'", "do not fit adapter 'l4'",
    "unexpected ['input_norm/bias', 'input_norm/scale', 'pos_embed']",
  )  # fmt: skip
  assert not (tmp_path / "out").exists()


def test_data_and_tool_user_errors(tmp_path):
  proc = _run("-m", "egpt_align.data", "inspect", str(tmp_path / "nope"))
  _assert_one_line_error(proc, "nope")
  proc = _run(
    "-m", "tools.convert_reference_chunks", str(tmp_path / "nope"),
    str(tmp_path / "out"),
  )  # fmt: skip
  _assert_one_line_error(proc, "nope")


def test_traceback_on_request(tmp_path):
  proc = _run(
    "-m", "egpt_align.evaluate", "--workdir", str(tmp_path),
    env={"EGPT_ALIGN_TRACEBACK": "1"},
  )  # fmt: skip
  assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_one_line_messages():
  assert (
    cli.one_line(KeyError("'x'\nDid you mean 'y'?")) == "'x' Did you mean 'y'?"
  )
  err = FileNotFoundError(2, "No such file or directory", "/a/b")
  assert cli.one_line(err) == "/a/b: No such file or directory"
  assert cli.one_line(ValueError("two\n  lines")) == "two lines"


def test_run_turns_messages_into_exit_2(capsys):
  def main():
    raise SystemExit("error: bad thing in f.json")

  with pytest.raises(SystemExit) as e:
    cli.run(main)
  assert e.value.code == 2
  assert capsys.readouterr().err == "error: bad thing in f.json\n"

  def bug():
    raise RuntimeError("a bug")

  with pytest.raises(RuntimeError):  # bugs keep their traceback
    cli.run(bug)
