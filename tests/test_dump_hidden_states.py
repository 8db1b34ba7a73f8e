"""Tests for tools/dump_hidden_states.py on tiny random models (CPU)."""

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
# Tiny models gain nothing from intra-op threads; on a shared, loaded CPU
# spinning worker threads only slow the tests down.
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from egpt_align.data.reader import open_dataset  # noqa: E402
from tests import toy_plugin as tp  # noqa: E402
from tools import dump_hidden_states as dump  # noqa: E402
from tools.lib import backends as bk  # noqa: E402
from tools.lib import generation  # noqa: E402

NUM = 6
NEW = 10
BF16_RTOL = 2.0**-8  # bfloat16 round-to-nearest relative error


@pytest.fixture(autouse=True)
def _no_grad():
  with torch.no_grad():
    yield


def _questions():
  return [
    " ".join(f"w{(7 * i + j) % 40}" for j in range(1 + (3 * i) % 6))
    for i in range(NUM)
  ]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """Saved tiny target (D=48, varied EOS) and drafter (D=32) + samples."""
  root = tmp_path_factory.mktemp("models")
  tok = tp.make_tokenizer()
  target = tp.make_llama(0, hidden=48, eos_boost=3.0)
  draft = tp.make_llama(1, hidden=32)
  for name, m in (("target", target), ("draft", draft)):
    m.save_pretrained(root / name)
    tok.save_pretrained(root / name)
  samples = root / "samples.jsonl"
  with open(samples, "w") as f:
    for i, q in enumerate(_questions()):
      media = {"draft": {"seed": i}}
      # Two questions per scene: the group evaluation resamples as a unit.
      rec = {"id": f"s{i}", "question": q, "media": media, "group": i // 2}
      f.write(json.dumps(rec) + "\n")
  return {
    "root": root,
    "tok": tok,
    "target": target,
    "draft": draft,
    "tspec": f"causal_lm:{root / 'target'}",
    "dspec": f"causal_lm:{root / 'draft'}",
    "samples": str(samples),
  }


def _run(models, out, *extra, target=None, draft=None, samples=None):
  argv = [
    "--target",
    target or models["tspec"],
    "--draft",
    draft or models["dspec"],
    "--samples",
    samples or models["samples"],
    "--out",
    str(out),
    "--max_new_tokens",
    str(NEW),
    "--device",
    "cpu",
    "--no_progress",
    *extra,
  ]
  return dump.main(argv)


def _prompt(tok, q):
  return torch.tensor([tok(bk.VICUNA_TEMPLATE.format(question=q))["input_ids"]])


@torch.no_grad()
def _reference(models):
  """Independent per-sample computation: HF generate + one full forward."""
  tok, target, draft = models["tok"], models["target"], models["draft"]
  refs = []
  for q in _questions():
    ids = _prompt(tok, q)
    p = ids.shape[1]
    out = target.generate(
      input_ids=ids,
      attention_mask=torch.ones_like(ids),
      max_new_tokens=NEW,
      do_sample=False,
    )
    toks = out[0, p:]
    n = len(toks)
    full = torch.cat([ids, toks[None, :-1]], dim=1)
    # h[t] predicts token t: positions p-1 .. p+n-2 of a full forward.
    t_h = target(input_ids=full, output_hidden_states=True).hidden_states[-1]
    d_h = draft(input_ids=full, output_hidden_states=True).hidden_states[-1]
    refs.append(
      {
        "tokens": toks.numpy(),
        "target": t_h[0, p - 1 : p - 1 + n].numpy(),
        "source": d_h[0, p - 1 : p - 1 + n].numpy(),
      }
    )
  return refs


@pytest.fixture(scope="module")
def reference(models):
  return _reference(models)


@pytest.fixture(scope="module")
def f32_dataset(models, tmp_path_factory):
  out = tmp_path_factory.mktemp("ds") / "f32"
  assert _run(models, out, "--store_dtype", "float32", "--batch_size", "1") == 0
  return open_dataset(str(out))


def test_teacher_forced_equals_independent_forward(
  f32_dataset, reference, models
):
  ds = f32_dataset
  assert ds.num_samples == NUM
  assert len(set(ds.lengths.tolist())) > 1  # EOS ends some samples early
  w = models["draft"].lm_head.weight.numpy()
  for i, ref in enumerate(reference):
    s = ds[i]
    assert s["meta"]["id"] == f"s{i}"
    assert s["meta"]["group"] == str(i // 2)
    want_text = models["tok"].decode(ref["tokens"], skip_special_tokens=True)
    assert s["meta"]["target_text"] == want_text
    np.testing.assert_array_equal(s["target_tokens"], ref["tokens"])
    np.testing.assert_allclose(s["target"], ref["target"], atol=1e-5)
    np.testing.assert_allclose(s["source"], ref["source"], atol=1e-5)
    # The stored drafter argmax is its LM head applied to the stored state.
    np.testing.assert_array_equal(
      s["draft_tokens"], (s["source"] @ w.T).argmax(-1)
    )
  prov = ds.header["provenance"]
  assert prov["pairing"] == "teacher_forced"
  assert prov["target"]["hidden_size"] == 48
  assert prov["source"]["prompt_template"] == bk.VICUNA_TEMPLATE


def test_bf16_batch4_equals_batch1(models, reference, f32_dataset, tmp_path):
  out = tmp_path / "bs4"
  assert _run(models, out, "--batch_size", "4") == 0  # bf16 storage default
  da, db = f32_dataset, open_dataset(str(out))
  assert db.header["dtype"] == "bfloat16"
  np.testing.assert_array_equal(da.lengths, db.lengths)
  for i, ref in enumerate(reference):
    sa, sb = da[i], db[i]
    for key in ("target_tokens", "draft_tokens"):
      np.testing.assert_array_equal(sa[key], sb[key])
    for key in ("source", "target"):
      got = sb[key].astype(np.float32)
      # Within bf16 rounding of the batch-1 float32 value and of the
      # independent forward (plus float32 noise).
      for want in (sa[key], ref[key]):
        tol = BF16_RTOL * np.abs(want) + 1e-5
        assert np.all(np.abs(got - want) <= tol), key


def test_free_running_pairs_by_step_and_truncates(models, tmp_path):
  out = tmp_path / "fr"
  rc = _run(
    models, out, "--pairing", "free_running", "--store_dtype", "float32"
  )
  assert rc == 0
  ds = open_dataset(str(out))
  tok, target, draft = models["tok"], models["target"], models["draft"]
  for i, q in enumerate(_questions()):
    ids = _prompt(tok, q)
    p = ids.shape[1]
    kw = {"max_new_tokens": NEW, "do_sample": False}
    t = target.generate(
      input_ids=ids, attention_mask=torch.ones_like(ids), **kw
    )
    d = draft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    t, d = t[0, p:].numpy(), d[0, p:].numpy()
    n = min(len(t), len(d))
    s = ds[i]
    assert len(s["target_tokens"]) == n
    assert s["meta"]["target_length"] == len(t)
    assert s["meta"]["draft_length"] == len(d)
    assert s["meta"]["group"] == str(i // 2)
    np.testing.assert_array_equal(s["target_tokens"], t[:n])
    np.testing.assert_array_equal(s["draft_tokens"], d[:n])
    # The drafter's states follow ITS OWN text: h_d[t] at its own tokens.
    full = torch.cat([ids, torch.tensor(d[None, : n - 1])], dim=1)
    h = draft(input_ids=full, output_hidden_states=True).hidden_states[-1]
    np.testing.assert_allclose(
      s["source"], h[0, p - 1 : p - 1 + n].numpy(), atol=1e-5
    )


def test_interrupt_keeps_finished_samples_and_resume_completes(
  models, f32_dataset, tmp_path, monkeypatch, capsys
):
  out = tmp_path / "resume"
  real = dump.Dumper.process
  calls = {"n": 0}

  def interrupted(self, batch):
    calls["n"] += 1
    if calls["n"] == 3:
      raise KeyboardInterrupt
    return real(self, batch)

  monkeypatch.setattr(dump.Dumper, "process", interrupted)
  extra = ("--store_dtype", "float32", "--batch_size", "2")
  assert _run(models, out, *extra) == dump.EXIT_INTERRUPTED
  assert "interrupted" in capsys.readouterr().err
  # Samples sit in an unfinished shard (samples_per_shard=1024): the
  # interrupt must still flush them.
  assert open_dataset(str(out)).num_samples == 4
  monkeypatch.setattr(dump.Dumper, "process", real)
  assert _run(models, out, *extra) == 0
  summary = capsys.readouterr().err
  assert '"samples_already_done": 4' in summary
  ds = open_dataset(str(out))
  assert [ds.meta(i)["id"] for i in range(ds.num_samples)] == [
    f"s{i}" for i in range(NUM)
  ]
  for i in range(NUM):
    for key in ("source", "target", "target_tokens", "draft_tokens"):
      np.testing.assert_allclose(ds[i][key], f32_dataset[i][key], atol=1e-6)
  # A different setup must not be appended to the same dataset.
  rc = _run(models, out, *extra, "--pairing", "free_running")
  assert rc == dump.EXIT_USAGE
  assert "cannot resume" in capsys.readouterr().err


def test_failing_samples_are_reported_and_exit_nonzero_plugin(
  models, tmp_path, capsys
):
  samples = tmp_path / "s.jsonl"
  with open(samples, "w") as f:
    for i, q in enumerate(_questions()[:5]):
      seed = "oops" if i == 2 else i
      rec = {"id": f"p{i}", "question": q, "media": {"draft": {"seed": seed}}}
      f.write(json.dumps(rec) + "\n")
  out = tmp_path / "plug"
  rc = _run(
    models,
    out,
    "--batch_size",
    "2",
    draft="tests.toy_plugin:make_backend:1",
    samples=str(samples),
  )
  assert rc == dump.EXIT_FAILED
  err = capsys.readouterr().err
  assert "FAILED sample 'p2'" in err and "seed" in err
  with open(out / "failures.jsonl") as f:
    fails = [json.loads(line) for line in f]
  assert [x["id"] for x in fails] == ["p2"]
  assert fails[0]["stage"] == "draft inputs" and "int" in fails[0]["reason"]
  ds = open_dataset(str(out))
  assert [ds.meta(i)["id"] for i in range(4)] == ["p0", "p1", "p3", "p4"]
  assert ds.header["provenance"]["source"]["backend"] == "toy_plugin"
  # The plugin's states are its own teacher-forced states on target tokens.
  plug = tp.make_backend("1")
  s = ds[0]
  x = plug.prompt_inputs(
    {"id": "p0", "question": _questions()[0], "media": {"seed": 0}}
  )
  toks = torch.tensor(s["target_tokens"].astype(np.int64))
  full = torch.cat([x["input_ids"], toks[None, :-1]], dim=1)
  h = plug.model(input_ids=full, output_hidden_states=True).hidden_states[-1]
  p, n = x["input_ids"].shape[1], len(toks)
  want = h[0, p - 1 : p - 1 + n].numpy()
  got = s["source"].astype(np.float32)
  assert np.all(np.abs(got - want) <= BF16_RTOL * np.abs(want) + 1e-5)


def test_model_failure_isolated_to_its_sample(models, tmp_path, monkeypatch):
  real = generation.run_batch

  def flaky(target, draft, items, **kw):
    if any(s["id"] == "s5" for s, _, _ in items):
      raise RuntimeError("boom on s5")
    return real(target, draft, items, **kw)

  monkeypatch.setattr(generation, "run_batch", flaky)
  out = tmp_path / "flaky"
  assert _run(models, out, "--batch_size", "4") == dump.EXIT_FAILED
  with open(out / "failures.jsonl") as f:
    fails = [json.loads(line) for line in f]
  assert [(x["id"], x["stage"]) for x in fails] == [("s5", "model")]
  assert "boom on s5" in fails[0]["reason"]
  assert open_dataset(str(out)).num_samples == NUM - 1


def test_target_token_outside_drafter_vocab_fails_that_sample(models):
  target = bk.CausalLMBackend(models["target"], models["tok"])
  draft = bk.CausalLMBackend(models["draft"], models["tok"])
  qs = _questions()[:3]
  items = [
    (
      {"id": f"s{i}", "question": q},
      target.prompt_inputs({"question": q}),
      draft.prompt_inputs({"question": q}),
    )
    for i, q in enumerate(qs)
  ]
  gen = generation.greedy_generate(
    target, target.collate([x for _, x, _ in items]), NEW
  )
  # Shrink the drafter's vocabulary below sample 1's largest token.
  limit = int(gen.tokens[1, : gen.lengths[1]].max())
  draft.vocab_size = limit
  res = generation.run_batch(
    target, draft, items, pairing="teacher_forced", max_new_tokens=NEW
  )
  for i, (_, rec) in enumerate(res):
    toks = gen.tokens[i, : gen.lengths[i]]
    if int(toks.max()) >= limit:
      assert isinstance(rec, str) and "outside the drafter's vocabulary" in rec
    else:
      assert isinstance(rec, dict)
  assert isinstance(res[1][1], str)


def test_video_llava_target(models, tmp_path):
  from tests.test_backends import _write_frames, make_video_llava

  tok = models["tok"]
  vl, ip = make_video_llava(tok, seed=2)
  vdir = tmp_path / "vl"
  vl.save_pretrained(vdir)
  tok.save_pretrained(vdir)
  ip.save_pretrained(vdir)
  _write_frames(tmp_path / "media" / "clip0", 6, seed=0)
  _write_frames(tmp_path / "media" / "clip1", 9, seed=1)
  samples = tmp_path / "media" / "s.jsonl"
  qs = _questions()[:4]
  with open(samples, "w") as f:
    for i, q in enumerate(qs):
      media = {"target": {"video": f"clip{i % 2}"}}  # relative to the file
      f.write(json.dumps({"id": f"v{i}", "question": q, "media": media}) + "\n")
  out = tmp_path / "vds"
  rc = _run(
    models,
    out,
    "--num_frames",
    "3",
    "--store_dtype",
    "float32",
    "--batch_size",
    "4",
    target=f"video_llava:{vdir}",
    samples=str(samples),
  )
  assert rc == 0
  ds = open_dataset(str(out))
  prov = ds.header["provenance"]["target"]
  assert prov["prompt_template"] == "USER: <video>\n{question} ASSISTANT:"
  assert prov["frame_policy"]["num_frames"] == 3
  backend = bk.VideoLlavaBackend(vl, tok, ip, num_frames=3)
  for i, q in enumerate(qs):
    media = {"video": str(tmp_path / "media" / f"clip{i % 2}")}
    x = backend.prompt_inputs({"id": "x", "question": q, "media": media})
    out_ = vl.generate(
      **x,
      max_new_tokens=NEW,
      do_sample=False,
      output_hidden_states=True,
      return_dict_in_generate=True,
    )
    toks = out_.sequences[0, x["input_ids"].shape[1] :].numpy()
    states = torch.stack([h[-1][0, -1] for h in out_.hidden_states]).numpy()
    np.testing.assert_array_equal(ds[i]["target_tokens"], toks)
    np.testing.assert_allclose(ds[i]["target"], states, atol=1e-5)


def test_bad_samples_file_is_a_clear_error(models, tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(
    '{"id": "a", "question": "w1"}\n{"id": "a", "question": "w2"}\n'
  )
  assert _run(models, tmp_path / "o", samples=str(bad)) == dump.EXIT_USAGE
  assert "bad.jsonl:2: id 'a' repeats line 1" in capsys.readouterr().err
  bad.write_text('{"id": "a"}\n')
  assert _run(models, tmp_path / "o", samples=str(bad)) == dump.EXIT_USAGE
  assert "'question' must be a string" in capsys.readouterr().err
  bad.write_text('{"id": "a", "question": "q", "media": {"verifier": {}}}\n')
  assert _run(models, tmp_path / "o", samples=str(bad)) == dump.EXIT_USAGE
  assert "unknown media roles ['verifier']" in capsys.readouterr().err
  bad.write_text(
    '{"id": "a", "question": "q", "group": 1}\n{"id": "b", "question": "q"}\n'
  )
  assert _run(models, tmp_path / "o", samples=str(bad)) == dump.EXIT_USAGE
  assert "bad.jsonl: sample 'b' has no 'group'" in capsys.readouterr().err


def test_help_documents_schema_and_specs(capsys):
  with pytest.raises(SystemExit) as e:
    dump.main(["--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  for word in ("teacher_forced", "media", "video_llava:", "factory", "resum"):
    assert word in text


def test_end_to_end_dump_train_evaluate(tmp_path):
  train = pytest.importorskip("egpt_align.train", reason="trainer not there")
  evaluate = pytest.importorskip("egpt_align.evaluate", reason="no evaluator")
  from egpt_align.configs import base

  # Same hidden size on both sides, as the adapters map D -> D.
  tok = tp.make_tokenizer()
  root = tmp_path / "m"
  for name, seed, boost in (("t", 0, 1.5), ("d", 1, 1.0)):
    tp.make_llama(seed, hidden=32, eos_boost=boost).save_pretrained(root / name)
    tok.save_pretrained(root / name)
  samples = tmp_path / "s.jsonl"
  with open(samples, "w") as f:
    for i in range(24):
      q = " ".join(f"w{(5 * i + j) % 40}" for j in range(1 + i % 4))
      f.write(json.dumps({"id": f"e{i}", "question": q}) + "\n")
  data = tmp_path / "data"
  argv = [
    "--target",
    f"causal_lm:{root / 't'}",
    "--draft",
    f"causal_lm:{root / 'd'}",
    "--samples",
    str(samples),
    "--out",
    str(data),
    "--max_new_tokens",
    "8",
    "--batch_size",
    "8",
    "--no_progress",
  ]
  assert dump.main(argv) == 0
  config = base.get_config()
  config.model.name = "l1"
  config.model.hidden_dim = 32
  config.data.train = str(data)
  config.data.val_fraction = 0.25
  config.batch_size = 8
  config.num_epochs = 1
  config.log_every_steps = 1
  workdir = tmp_path / "work"
  metrics = train.train_and_evaluate(config, str(workdir))
  assert metrics["step"] > 0
  result = evaluate.evaluate(
    str(data),
    workdir=str(workdir),
    settings=evaluate.EvalSettings(bootstrap=0, progress=False),
  )
  positions = int(open_dataset(str(data)).lengths.sum())
  assert positions > 2 * 24  # not degenerate (EOS at once)
  numbers = list(_numbers(result.metrics))
  assert numbers and all(np.isfinite(v) for v in numbers)
  assert positions in numbers  # every dumped position was evaluated


def _numbers(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _numbers(v)
  elif isinstance(tree, (list, tuple)):
    for v in tree:
      yield from _numbers(v)
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield tree


def test_benchmark_dump_smoke(tmp_path, capsys):
  from tools.benchmarks import benchmark_dump

  out = tmp_path / "bench.json"
  argv = ["--small", "--num_samples", "4", "--ref_samples", "2"]
  argv += ["--max_new_tokens", "4", "--device", "cpu", "--out", str(out)]
  assert benchmark_dump.main(argv) == 0
  report = json.loads(out.read_text())
  res = report["results"]
  assert set(res) == {"reference", "teacher_forced", "free_running"}
  # EOS is suppressed: every method stores max_new_tokens per sample.
  assert res["reference"]["positions"] == 2 * 4
  assert res["teacher_forced"]["positions"] == 4 * 4
  assert res["free_running"]["positions"] == 4 * 4
  assert res["reference"]["speedup_vs_reference"] == 1.0
  assert "samples/s" in capsys.readouterr().out


def test_resume_accepts_the_same_models_moved_and_refuses_others(
  models, tmp_path, monkeypatch, capsys
):
  """A dataset's identity is what its models are (a fingerprint of their
  weights and config), not the directory they were loaded from."""
  out = tmp_path / "moved"
  real = dump.Dumper.process
  calls = {"n": 0}

  def interrupted(self, batch):
    calls["n"] += 1
    if calls["n"] == 2:
      raise KeyboardInterrupt
    return real(self, batch)

  monkeypatch.setattr(dump.Dumper, "process", interrupted)
  extra = ("--store_dtype", "float32", "--batch_size", "2")
  assert _run(models, out, *extra) == dump.EXIT_INTERRUPTED
  monkeypatch.setattr(dump.Dumper, "process", real)
  moved = tmp_path / "elsewhere"
  shutil.copytree(models["root"] / "target", moved / "target")
  shutil.copytree(models["root"] / "draft", moved / "draft")
  spec = {"target": f"causal_lm:{moved / 'target'}"}
  spec["draft"] = f"causal_lm:{moved / 'draft'}"
  capsys.readouterr()
  assert _run(models, out, *extra, **spec) == 0
  assert '"samples_already_done": 2' in capsys.readouterr().err
  assert open_dataset(str(out)).num_samples == NUM
  # Other weights under the same path are another model.
  other = tmp_path / "other"
  shutil.copytree(moved / "draft", other / "draft")
  fresh = tmp_path / "fresh"
  draft = f"causal_lm:{other / 'draft'}"
  assert _run(models, fresh, *extra, "--max_samples", "2", draft=draft) == 0
  tp.make_llama(2, hidden=32).save_pretrained(other / "draft")
  capsys.readouterr()
  assert _run(models, fresh, *extra, draft=draft) == dump.EXIT_USAGE
  err = capsys.readouterr().err
  assert "cannot resume" in err and "weights_fingerprint" in err
