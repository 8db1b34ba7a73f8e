"""Tests for the InputPipeline: shuffle, buckets, resume, sharding, caches."""

import collections

import jax
import numpy as np
import pytest

from egpt_align import data
from egpt_align.data import device_cache

D = 32


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("pipe") / "ds")
  data.synthetic.write_synthetic_dataset(
    path,
    203,
    hidden_dim=D,
    min_len=3,
    max_len=41,
    seed=3,
    samples_per_shard=50,
    vocab_size=64,
  )
  return data.open_dataset(path)


def _mesh_sharding():
  mesh = jax.make_mesh((8,), ("data",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def _indices(batches):
  return [np.asarray(b["index"]) for b in batches]


def _pipe(ds, **kw):
  kw.setdefault("global_batch_size", 16)
  kw.setdefault("progress", False)
  return data.InputPipeline(ds, **kw)


def test_epoch_covers_every_sample_once_and_differs(ds):
  pipe = _pipe(ds, drop_remainder=False, cache="none", seed=7)
  e0 = np.concatenate(_indices(pipe.batches(0)))
  e1 = np.concatenate(_indices(pipe.batches(1)))
  assert len(e0) == pipe.steps_per_epoch * 16
  for e in (e0, e1):
    real = e[e >= 0]
    np.testing.assert_array_equal(np.sort(real), np.arange(ds.num_samples))
  assert not np.array_equal(e0, e1)
  again = np.concatenate(_indices(pipe.batches(0)))
  np.testing.assert_array_equal(e0, again)  # deterministic in (seed, epoch)
  other = _pipe(ds, drop_remainder=False, cache="none", seed=8)
  assert not np.array_equal(e0, np.concatenate(_indices(other.batches(0))))


def test_batch_membership_is_reshuffled_every_epoch(ds):
  # Not only the order of the batches: which samples share a batch changes
  # from epoch to epoch (the within-bucket shuffle is seeded by the epoch).
  pipe = _pipe(ds, cache="none", seed=7, bucket_lengths=[48])

  def groups(epoch):
    return {frozenset(pos[pos >= 0].tolist()) for _, pos in pipe.plan(epoch)}

  g0, g1, g2 = groups(0), groups(1), groups(2)
  assert len(g0) == pipe.steps_per_epoch
  assert not g0 & g1 and not g1 & g2 and not g0 & g2


def test_shuffle_is_global_not_chunk_local(ds):
  # The first batch of an epoch should draw from across the whole dataset
  # (shards hold 50 samples each).
  pipe = _pipe(ds, cache="none", bucket_lengths=[48])
  shards = set()
  for e in range(3):
    first = np.asarray(next(iter(pipe.batches(e)))["index"])
    shards |= set((first // 50).tolist())
  assert len(shards) >= 4


def test_drop_remainder_and_bucket_shapes(ds):
  buckets = (8, 16, 24, 48)
  pipe = _pipe(ds, bucket_lengths=buckets, cache="none")
  bucket_of = np.searchsorted(buckets, ds.lengths)
  counts = np.bincount(bucket_of, minlength=len(buckets))
  assert pipe.steps_per_epoch == int((counts // 16).sum())
  seen = []
  for b in pipe.batches(0):
    idx = np.asarray(b["index"])
    seq_len = b["mask"].shape[1]
    assert seq_len in buckets and (idx >= 0).all()
    # Every sample of a batch belongs to that bucket (padding is minimal).
    assert (bucket_of[idx] == buckets.index(seq_len)).all()
    np.testing.assert_array_equal(np.asarray(b["lengths"]), ds.lengths[idx])
    seen.extend(idx.tolist())
  assert len(seen) == len(set(seen)) == pipe.steps_per_epoch * 16


def test_default_buckets_are_few_multiples_of_8(ds):
  pipe = _pipe(ds, cache="none")
  assert 1 < len(pipe.bucket_lengths) <= 8
  assert all(b % 8 == 0 for b in pipe.bucket_lengths[:-1])
  assert pipe.bucket_lengths[-1] == ds.lengths.max()
  # Reference-like lengths (capped at 50): the last bucket is exactly 50.
  lengths = np.clip(np.random.default_rng(0).normal(34, 10, 1000), 5, 50)
  buckets = data.pipeline.default_bucket_lengths(lengths.astype(int))
  assert buckets == (24, 32, 40, 48, 50)
  with pytest.raises(ValueError, match="longer than the largest bucket 16"):
    _pipe(ds, bucket_lengths=[8, 16])


def test_batch_contents_match_dataset(ds):
  pipe = _pipe(ds, drop_remainder=False, cache="none")
  batches = list(pipe.batches(2))
  for b in batches:
    src = np.asarray(b["source"])
    tgt = np.asarray(b["target"])
    tok = np.asarray(b["target_tokens"])
    mask = np.asarray(b["mask"])
    for j, i in enumerate(np.asarray(b["index"])):
      if i < 0:  # validation padding row
        assert not mask[j].any() and b["lengths"][j] == 0
        assert not src[j].astype(np.float32).any()
        continue
      sample = ds[i]
      n = len(sample["source"])
      assert mask[j].sum() == n and mask[j, :n].all()
      np.testing.assert_array_equal(src[j, :n], sample["source"])
      np.testing.assert_array_equal(tgt[j, :n], sample["target"])
      np.testing.assert_array_equal(tok[j, :n], sample["target_tokens"])
      assert not src[j, n:].astype(np.float32).any()
  assert any((np.asarray(b["index"]) < 0).any() for b in batches)


def test_resume_from_step_equals_skipping(ds):
  pipe = _pipe(ds, cache="none", drop_remainder=False, seed=1)
  full = list(pipe.batches(4))
  k = 5
  resumed = list(pipe.batches(4, start_step=k))
  assert len(resumed) == len(full) - k
  for a, b in zip(full[k:], resumed, strict=True):
    for key in a:
      np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


@pytest.mark.parametrize("sharded", [False, True])
def test_device_cache_equals_host_cache_equals_streaming(ds, sharded):
  sharding = _mesh_sharding() if sharded else None
  runs = {}
  for cache in ("none", "host", "device"):
    pipe = _pipe(
      ds,
      cache=cache,
      sharding=sharding,
      drop_remainder=False,
      seed=5,
      fields=("source", "target", "draft_tokens"),
      # Few buckets: device mode compiles one gather per bucket and device.
      bucket_lengths=(24, 48) if sharded else None,
    )
    assert pipe.cache == cache
    runs[cache] = list(pipe.batches(1, start_step=2))
  for cache in ("host", "device"):
    assert len(runs[cache]) == len(runs["none"])
    for a, b in zip(runs["none"], runs[cache], strict=True):
      assert (
        set(a)
        == set(b)
        == {"source", "target", "draft_tokens", "mask", "lengths", "index"}
      )
      for key in a:
        assert b[key].shape == a[key].shape and b[key].dtype == a[key].dtype
        if sharded:
          assert b[key].sharding.is_equivalent_to(sharding, b[key].ndim)
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


def test_device_gathers_several_batches_per_dispatch(ds, monkeypatch):
  # Batches of one bucket are gathered gather_batches at a time, yet come
  # out in the plan's order (resumed mid-epoch here) and equal the host's.
  host = _pipe(ds, cache="host", drop_remainder=False, seed=7)
  start = 3
  want = list(host.batches(2, start_step=start))
  lens = collections.Counter(s for s, _ in host.plan(2)[start:])
  calls = []
  original = device_cache._device_batches_at

  def counting(cache, plan, first, count, seq_len):
    calls.append((seq_len, count))
    return original(cache, plan, first, count, seq_len)

  monkeypatch.setattr(device_cache, "_device_batches_at", counting)
  for g in (1, 2, 5):
    calls.clear()
    pipe = _pipe(
      ds, cache="device", drop_remainder=False, seed=7, gather_batches=g
    )
    got = list(pipe.batches(2, start_step=start))
    assert len(got) == len(want)
    for a, b in zip(want, got, strict=True):
      for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
    assert len(calls) == sum(-(-n // g) for n in lens.values())
    assert all(1 <= c <= g for _, c in calls)
    assert collections.Counter(s for s, c in calls for _ in range(c)) == lens
  with pytest.raises(ValueError, match="gather_batches"):
    _pipe(ds, cache="host", gather_batches=0)


@pytest.mark.parametrize(
  "cache, sharded", [("none", False), ("host", False), ("none", True)]
)
def test_recycled_buffers_give_the_same_batches(ds, cache, sharded):
  sharding = _mesh_sharding() if sharded else None
  fresh = _pipe(ds, cache=cache, drop_remainder=False, seed=9)
  reused = _pipe(
    ds,
    cache=cache,
    drop_remainder=False,
    seed=9,
    num_workers=3,
    sharding=sharding,
  )
  reused.recycle_buffers = True
  a, b = list(fresh.batches(0)), list(reused.batches(0))
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    for key in x:
      np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]))
      assert y[key].sharding.memory_kind == x[key].sharding.memory_kind
      if sharded:
        assert y[key].sharding.is_equivalent_to(sharding, y[key].ndim)


def test_auto_cache_respects_budget(ds):
  assert _pipe(ds, cache="auto", host_budget_bytes=0).cache == "none"
  assert _pipe(ds, cache="auto", host_budget_bytes=1 << 40).cache == "host"
  p = _pipe(ds, cache="auto", device_budget_bytes=1 << 40)
  assert p.cache == "device"


def test_processes_partition_samples_with_common_shapes(ds):
  pipes = [
    _pipe(
      ds,
      cache="host",
      process_index=p,
      process_count=2,
      drop_remainder=False,
      seed=2,
    )
    for p in range(2)
  ]
  assert pipes[0].steps_per_epoch == pipes[1].steps_per_epoch
  plans = [list(p.numpy_batches(3)) for p in pipes]
  seen = collections.Counter()
  for b0, b1 in zip(*plans, strict=True):
    assert (
      b0["source"].shape == b1["source"].shape == (8,) + b0["source"].shape[1:]
    )
    for b in (b0, b1):
      seen.update(b["index"][b["index"] >= 0].tolist())
  assert sorted(seen) == list(range(ds.num_samples))
  assert set(seen.values()) == {1}
  # Shares are disjoint and balanced.
  assert not set(pipes[0].share) & set(pipes[1].share)
  assert abs(len(pipes[0].share) - len(pipes[1].share)) <= 8


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_global_batches_do_not_depend_on_the_process_count(ds, drop_remainder):
  """Processes' local batches, stacked, are the one-process batches."""

  def global_batches(count):
    pipes = [
      _pipe(
        ds,
        cache="host",
        process_index=p,
        process_count=count,
        drop_remainder=drop_remainder,
        seed=5,
      )
      for p in range(count)
    ]
    per_process = [list(p.numpy_batches(2)) for p in pipes]
    return [
      np.concatenate([b["index"] for b in step])
      for step in zip(*per_process, strict=True)
    ]

  one = global_batches(1)
  for count in (2, 4):
    many = global_batches(count)
    assert len(many) == len(one)
    for a, b in zip(many, one, strict=True):
      np.testing.assert_array_equal(a, b)


def test_sharded_batch_is_global(ds):
  sharding = _mesh_sharding()
  pipe = _pipe(ds, cache="host", sharding=sharding, global_batch_size=24)
  b = next(iter(pipe.batches(0)))
  assert b["source"].shape[0] == 24
  assert len(b["source"].addressable_shards) == 8
  assert b["source"].addressable_shards[0].data.shape[0] == 3


def test_indices_subset_and_early_stop(ds):
  subset = np.arange(0, ds.num_samples, 3)
  pipe = _pipe(
    ds,
    indices=subset,
    cache="none",
    drop_remainder=False,
    global_batch_size=8,
    prefetch=1,
  )
  got = np.concatenate(_indices(pipe.batches(0)))
  np.testing.assert_array_equal(np.sort(got[got >= 0]), subset)
  it = pipe.batches(1)
  next(it)
  it.close()  # must not hang on the prefetch thread
  with pytest.raises(IndexError):
    _pipe(ds, indices=[ds.num_samples])
  with pytest.raises(ValueError, match="not divisible"):
    _pipe(ds, global_batch_size=9, process_count=2)
  with pytest.raises(KeyError, match="no field 'foo'"):
    _pipe(ds, fields=("source", "foo"))
