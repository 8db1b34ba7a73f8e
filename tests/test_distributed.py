"""Training as several processes (jax.distributed over CPU gloo).

Each run is the CLI (`python -m egpt_align.train`) on the demo, started as
subprocesses on localhost: two processes of 4 fake CPU devices each, or one
of 8. Every run stops at global step STEPS, so all of them end at the same
point of the same schedule.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from egpt_align import checkpoint

# One worker runs this module (pyproject: --dist loadgroup), so the module's
# fixtures (the reference run, the stopped run) are made once.
pytestmark = pytest.mark.xdist_group("distributed")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12  # 3 epochs of 4 steps (72 training samples, global batch 16)
CHECK_EVERY = 3  # config.distributed.stop_check_every_steps
HEARTBEAT_S = 10  # config.distributed.heartbeat_timeout_s
WAIT_S = 240  # a run that takes longer than this hangs

_OVERRIDES = (
  "--config.num_epochs=10",  # the cosine schedule's length, for every run
  f"--config.stop_after_steps={STEPS}",
  "--config.data.synthetic.num_samples=80",
  "--config.data.synthetic.hidden_dim=32",
  "--config.model.hidden_dim=32",
  "--config.model.ffn_dim=64",
  "--config.eval_at_start=False",
  "--config.progress_bar=False",
  "--config.log_every_steps=1",  # a train/loss record per step
  "--config.checkpoint.every_steps=2",
  f"--config.distributed.stop_check_every_steps={CHECK_EVERY}",
  f"--config.distributed.heartbeat_timeout_s={HEARTBEAT_S}",
)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


class _Run:
  """One training run: `num_processes` CLI processes on one workdir."""

  def __init__(self, workdir, num_processes, devices, *extra):
    self.workdir = str(workdir)
    self.logs = []
    self.procs = []
    port = _free_port()
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    for i in range(num_processes):
      cmd = [
        sys.executable,
        "-m",
        "egpt_align.train",
        "--config",
        os.path.join(REPO, "experiments", "demo.py"),
        "--workdir",
        self.workdir,
        *_OVERRIDES,
        *extra,
      ]
      if num_processes > 1:
        cmd += [
          "--config.multihost=True",
          f"--config.distributed.coordinator_address=localhost:{port}",
          f"--config.distributed.num_processes={num_processes}",
          f"--config.distributed.process_id={i}",
        ]
      log = f"{self.workdir}.{i}.log"
      self.logs.append(log)
      with open(log, "w") as out:
        self.procs.append(
          subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
          )
        )

  def log(self, i: int) -> str:
    with open(self.logs[i]) as f:
      return f.read()

  def wait_for(self, condition, what: str) -> None:
    """Polls `condition()` until true; fails if a process ends first."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
      ended = [p.poll() for p in self.procs]
      if any(rc is not None for rc in ended) or time.monotonic() > deadline:
        self.kill()
        pytest.fail(f"{what}: never happened (exit codes {ended})")
      time.sleep(0.2)

  def wait(self, timeout: float = WAIT_S, only=None) -> list[int]:
    """Exit codes (of processes `only`); kills all and fails past timeout."""
    deadline = time.monotonic() + timeout
    codes = []
    for i, p in enumerate(self.procs):
      if only is not None and i not in only:
        continue
      try:
        codes.append(p.wait(timeout=max(deadline - time.monotonic(), 0.1)))
      except subprocess.TimeoutExpired:
        self.kill()
        pytest.fail(
          f"process {i} still running after {timeout:.0f} s (a hang); its "
          f"log ends:\n{self.log(i)[-3000:]}"
        )
    return codes

  def succeed(self) -> None:
    codes = self.wait()
    for i, rc in enumerate(codes):
      assert rc == 0, f"process {i} exited {rc}:\n{self.log(i)[-3000:]}"

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _params(workdir):
  return checkpoint.load_params(str(workdir), "latest")[0]


def _steps(workdir) -> list[int]:
  path = os.path.join(str(workdir), checkpoint.CHECKPOINT_DIR)
  if not os.path.isdir(path):
    return []
  return sorted(int(name) for name in os.listdir(path) if name.isdigit())


def _train_losses(workdir) -> dict[int, float]:
  """{step: train/loss} from metrics.jsonl (one record per step)."""
  with open(os.path.join(str(workdir), "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  steps = [r["step"] for r in records if "train/loss" in r]
  assert steps == sorted(set(steps)), steps  # one writer, no step twice
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def _assert_same_run(workdir, reference):
  """The same loss at every step and the same final params."""
  ref_params, ref_losses = reference
  losses = _train_losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  np.testing.assert_allclose(
    [losses[s] for s in sorted(losses)],
    [ref_losses[s] for s in sorted(losses)],
    rtol=1e-5,
  )
  _assert_params_close(_params(workdir), ref_params)


def _assert_params_close(a, b):
  # Adam normalises updates, so float reduction-order noise in the gradient
  # all-reduce (gloo across processes vs. in-process) moves a parameter with
  # a near-zero gradient by up to ~lr: compare each leaf as a whole.
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b, strict=True):
    diff = np.linalg.norm(np.ravel(x - y)) / np.linalg.norm(np.ravel(y))
    assert diff < 1e-3, diff


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Params after STEPS steps: one process, 8 devices, uninterrupted."""
  run = _Run(tmp_path_factory.mktemp("one") / "run", 1, 8)
  run.succeed()
  assert _steps(run.workdir)[-1] == STEPS
  return _params(run.workdir), _train_losses(run.workdir)


def test_two_processes_match_one(reference, tmp_path):
  """Uninterrupted: 2 processes x 4 devices give the 1 x 8 result."""
  whole = _Run(tmp_path / "two", 2, 4)
  whole.succeed()
  _assert_same_run(whole.workdir, reference)
  assert "training from step 0" in whole.log(0)
  assert "training from step" not in whole.log(1)  # process 0 logs


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
  """(run, k): SIGTERM to process 0 only, during its first step (the
  compile); both processes stopped at step k."""
  run = _Run(tmp_path_factory.mktemp("stopped") / "run", 2, 4)
  run.wait_for(lambda: "training from step 0" in run.log(0), "training started")
  run.procs[0].send_signal(signal.SIGTERM)
  codes = run.wait()
  assert codes == [128 + signal.SIGTERM] * 2, (
    codes,
    run.log(0)[-2000:],
    run.log(1)[-2000:],
  )
  return run, _steps(run.workdir)[-1]


def test_sigterm_on_one_process_stops_all_at_one_agreed_step(stopped):
  run, k = stopped
  # One checkpoint, at a step where the processes check their flags.
  assert 0 < k < STEPS and k % CHECK_EVERY == 0, k
  assert f"interrupted by signal 15 at step {k}" in run.log(1)


@pytest.mark.parametrize("processes, devices", [(2, 4), (1, 8)])
def test_stopped_run_resumes_on_any_process_count(
  stopped, reference, tmp_path, processes, devices
):
  """Restarted from step k, as 2 processes or as 1 of 8 devices: as if
  never stopped."""
  run, _ = stopped
  workdir = tmp_path / "again"
  shutil.copytree(run.workdir, workdir)
  _Run(workdir, processes, devices).succeed()
  _assert_same_run(workdir, reference)


def test_a_workdir_in_use_refuses_every_process(tmp_path):
  """Process 0 finds the workdir locked: both processes exit 2 at once."""
  from egpt_align import workdir as workdir_lib

  busy = tmp_path / "busy"
  busy.mkdir()
  with workdir_lib.owned(str(busy)):
    run = _Run(busy, 2, 4)
    codes = run.wait()
  assert codes == [2, 2], (codes, run.log(0)[-2000:], run.log(1)[-2000:])
  assert f"in use by another training run (pid {os.getpid()}" in run.log(0)
  assert "process 0 could not lock it" in run.log(1)
  for i in (0, 1):
    errors = [x for x in run.log(i).splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in run.log(i), run.log(i)
  assert os.listdir(busy) == [workdir_lib.LOCK_FILE]  # nothing written


def test_killed_process_ends_the_others(tmp_path):
  """SIGKILL one process: the other exits non-zero, checkpoints stay."""
  run = _Run(tmp_path / "killed", 2, 4, "--config.stop_after_steps=0")
  run.wait_for(lambda: _steps(run.workdir)[-1:] >= [4], "a checkpoint")
  run.procs[1].kill()
  start = time.monotonic()
  (code,) = run.wait(timeout=HEARTBEAT_S + 60, only=[0])
  assert code != 0, run.log(0)[-2000:]
  assert time.monotonic() - start < HEARTBEAT_S + 60
  # The newest complete checkpoint restores (a save cut short never
  # becomes a step).
  params = _params(run.workdir)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
