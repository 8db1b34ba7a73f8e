"""A dump split over processes (tools/lib/dump_parts.py) reads like one."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
torch.set_num_threads(1)

from egpt_align.data.reader import open_dataset  # noqa: E402
from tests import toy_plugin as tp  # noqa: E402
from tools import dump_hidden_states as dump  # noqa: E402
from tools.lib import dump_parts  # noqa: E402

NUM = 7
BATCH = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Two tiny saved models, NUM samples, and a one-process dump of them."""
  root = tmp_path_factory.mktemp("parts")
  tok = tp.make_tokenizer()
  for name, seed, hidden in (("target", 0, 48), ("draft", 1, 32)):
    model = tp.make_llama(seed, hidden=hidden, eos_boost=3.0)
    model.save_pretrained(root / name)
    tok.save_pretrained(root / name)
  samples = root / "samples.jsonl"
  with open(samples, "w") as f:
    for i in range(NUM):
      q = " ".join(f"w{(5 * i + j) % 40}" for j in range(1 + (3 * i) % 5))
      f.write(json.dumps({"id": f"s{i}", "question": q}) + "\n")
  argv = [
    "--target",
    f"causal_lm:{root / 'target'}",
    "--draft",
    f"causal_lm:{root / 'draft'}",
    "--samples",
    str(samples),
    "--max_new_tokens",
    "6",
    "--batch_size",
    str(BATCH),
    "--samples_per_shard",
    "2",
    "--store_dtype",
    "float32",
    "--device",
    "cpu",
    "--no_progress",
  ]
  single = root / "single"
  assert dump.main(argv + ["--out", str(single)]) == 0
  return {"root": root, "argv": argv, "single": str(single)}


def _assert_same_dataset(path, ref):
  got, want = open_dataset(str(path)), open_dataset(ref)
  ids = [got.meta(i)["id"] for i in range(got.num_samples)]
  assert ids == [want.meta(i)["id"] for i in range(want.num_samples)]
  assert ids == [f"s{i}" for i in range(NUM)]
  for i in range(NUM):
    for key in ("target_tokens", "draft_tokens"):
      np.testing.assert_array_equal(got[i][key], want[i][key])
    # States to float32 rounding: a child process's CPU thread count can
    # change a matmul's summation order (seen: 1 ulp, 3.6e-7, in CI).
    for key in ("source", "target"):
      np.testing.assert_allclose(got[i][key], want[i][key], rtol=0, atol=1e-5)
  with open(os.path.join(path, "header.json")) as f:
    header = json.load(f)
  with open(os.path.join(ref, "header.json")) as f:
    ref_header = json.load(f)
  assert header["provenance"] == ref_header["provenance"]
  for key in ("num_samples", "num_positions", "samples_per_shard", "dtype"):
    assert header[key] == ref_header[key]


def test_parts_are_whole_batches_in_order():
  samples = [{"id": f"s{i}"} for i in range(11)]
  for n in (1, 2, 3, 6, 8):
    parts = [dump_parts.part_samples(samples, n, i, 2) for i in range(n)]
    assert sum(parts, []) == samples
    assert all(len(p) % 2 == 0 for p in parts[:-1])
  with pytest.raises(ValueError, match="--shard 2: expected 0 <= shard"):
    dump_parts.part_samples(samples, 2, 2, 2)


def test_child_argv_takes_the_parts_flags_of_its_own():
  argv = ["--out", "o", "--processes", "2", "--batch_size=4", "--processes=2"]
  assert dump_parts.child_argv(argv, 2, 1) == [
    "--out",
    "o",
    "--batch_size=4",
    "--num_shards",
    "2",
    "--shard",
    "1",
  ]


def test_two_processes_read_like_one(setup, tmp_path, capsys):
  """The launcher on a CPU: two child processes, joined."""
  out = tmp_path / "two"
  assert dump.main(setup["argv"] + ["--out", str(out), "--processes", "2"]) == 0
  assert "dumping with 2 processes, on the CPU" in capsys.readouterr().err
  _assert_same_dataset(out, setup["single"])
  assert not os.path.exists(out / dump_parts.PARTS_DIR)
  assert not os.path.exists(out / dump_parts.FAILURES_FILE)


def test_parts_resume_join_and_rerun(setup, tmp_path, capsys):
  out = tmp_path / "manual"
  argv = setup["argv"] + ["--out", str(out), "--num_shards", "3"]
  # A part not finished yet: the join refuses, naming it.
  assert dump.main(argv + ["--shard", "0"]) == 0
  assert dump.main(argv + ["--join"]) == dump.EXIT_USAGE
  assert "part-1-of-3/summary.json: missing" in capsys.readouterr().err
  for shard in (1, 2):
    assert dump.main(argv + ["--shard", str(shard)]) == 0
  assert dump.main(argv + ["--join"]) == 0
  _assert_same_dataset(out, setup["single"])
  # A rerun after the join finds every sample in OUT: nothing to redo.
  assert dump.main(argv + ["--shard", "1"]) == 0
  assert '"samples_written": 0' in capsys.readouterr().err
  for shard in (0, 2):
    assert dump.main(argv + ["--shard", str(shard)]) == 0
  assert dump.main(argv + ["--join"]) == 0
  _assert_same_dataset(out, setup["single"])


def test_launcher_refuses_what_it_sets_itself(setup, tmp_path, capsys):
  argv = setup["argv"] + ["--out", str(tmp_path / "x"), "--processes", "2"]
  assert dump.main(argv + ["--num_shards", "2"]) == dump.EXIT_USAGE
  assert "--processes starts the parts itself" in capsys.readouterr().err
  argv = setup["argv"] + ["--out", str(tmp_path / "y"), "--join"]
  assert dump.main(argv) == dump.EXIT_USAGE
  assert "--join needs --num_shards N >= 2" in capsys.readouterr().err
