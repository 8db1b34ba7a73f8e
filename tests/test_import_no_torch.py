"""egpt_align and every submodule import with torch/transformers blocked."""

import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent(
  """
  import importlib, importlib.abc, pkgutil, sys

  BLOCKED = ("torch", "transformers", "torchvision", "safetensors.torch")

  class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
      if any(name == b or name.startswith(b + ".") for b in BLOCKED):
        raise ImportError(f"blocked import of {name}")
      return None

  sys.meta_path.insert(0, Block())
  import egpt_align

  names = ["egpt_align"]
  for info in pkgutil.walk_packages(egpt_align.__path__, "egpt_align."):
    if not info.name.endswith("__main__"):  # Importing it would run a CLI.
      names.append(info.name)
  failed = []
  for name in names:
    try:
      importlib.import_module(name)
    except ImportError as e:
      failed.append(f"{name}: {e}")
  leaked = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
  print("IMPORTED", len(names))
  if failed or leaked:
    print("FAILED", failed, "LEAKED", leaked)
    sys.exit(1)
  """
)


def test_import_without_torch():
  proc = subprocess.run(
    [sys.executable, "-c", _SCRIPT],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env={
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "PYTHONPATH": str(ROOT),
    },
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  # The walk must really have covered the package (models, losses, ...).
  count = int(proc.stdout.split("IMPORTED")[1].split()[0])
  assert count >= 5, proc.stdout
