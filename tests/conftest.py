"""Test setup: fake 8 CPU devices and a session's compilation cache, before
JAX starts."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session, in a temporary directory
# removed at the end: the tests never write into the user's cache
# (~/.cache/egpt_align/jax, evaluate's default, which honours
# JAX_COMPILATION_CACHE_DIR), and every process of the session (xdist workers,
# the command lines the tests start) reuses what another one compiled.
if "EGPT_ALIGN_TEST_JAX_CACHE" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="egpt_align_test_jax_")
  os.environ["EGPT_ALIGN_TEST_JAX_CACHE"] = _cache
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (
    _flags + " --xla_force_host_platform_device_count=8"
  ).strip()


import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_grad_mode_on():
  """CLI mains called in-process turn torch autograd off; tests expect on."""
  torch = sys.modules.get("torch")
  if torch is not None:
    torch.set_grad_enabled(True)
  yield
  torch = sys.modules.get("torch")
  if torch is not None:
    torch.set_grad_enabled(True)


@pytest.fixture(scope="session")
def tiny_scenes_pair(tmp_path_factory):
  """The tiny scenes pair, trained once for every test that needs one."""
  import torch

  from tools.scenes import models
  from tools.scenes import pair as pair_lib

  out = str(tmp_path_factory.mktemp("scenes") / "pair")
  info = pair_lib.make_pair(out, models.PRESETS["tiny"], 0, torch.device("cpu"))
  return out, info
