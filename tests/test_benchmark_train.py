"""tools/benchmarks/benchmark_train.py: the unrolled-training rows (CPU)."""

import json

from tools.benchmarks import benchmark_train


def test_unroll_rows_and_a_failing_k_is_one_error_line(tmp_path, capsys):
  argv = ["--small", "--levels=", "--torch=", "--ceiling_n=64"]
  argv += ["--unroll", "l5,b1", "--unroll_steps", "2", "--out", str(tmp_path)]
  assert benchmark_train.main(argv) == 0
  out = capsys.readouterr().out
  errors = [line for line in out.splitlines() if line.startswith("error:")]
  # L5 is never fed its own states: k = 2 is refused, in one line.
  assert len(errors) == 1 and errors[0].startswith("error: l5 unroll k=2:")
  with open(tmp_path / "benchmark_train.json") as f:
    rows = json.load(f)["rows"]
  assert [(r["level"], r["unroll_steps"]) for r in rows] == [
    ("l5", 2),
    ("b1", 2),
  ]
  assert "error" in rows[0] and "error" not in rows[1]
  assert rows[1]["impl"].endswith("[next, unroll k=2]") and rows[1]["ms"] > 0
