"""A TFDS-style random-access data source over a dataset directory.

`tfds.data_source(...)` and grain read any object with `__len__` and
`__getitem__` (the RandomAccessDataSource protocol) returning one record as
a dict of numpy arrays; `__getitems__` serves batched reads. This class
reads our own files (no conversion, no TensorFlow), so TFDS/grain pipelines
can consume the same directory the InputPipeline does. TFDS itself is
optional (`pip install -e ".[tfds]"`): the protocol is checked structurally
without it, and against TFDS's own protocol class where it is installed.
"""

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, SupportsIndex, runtime_checkable

import numpy as np

from egpt_align.data.reader import HiddenStateDataset, open_dataset


@runtime_checkable
class RandomAccessDataSource(Protocol):
  """TFDS's DataSource protocol (tfds.core.data_sources.base), restated."""

  def __len__(self) -> int: ...

  def __getitem__(self, key: SupportsIndex) -> Any: ...

  def __getitems__(self, keys: Iterable[int]) -> Any: ...


class HiddenStateDataSource:
  """Random-access records {source, target, length, tokens?, meta fields}."""

  def __init__(
    self,
    dataset: HiddenStateDataset | str,
    *,
    fields: Sequence[str] | None = None,
    meta_keys: Sequence[str] = (),
  ):
    if not isinstance(dataset, HiddenStateDataset):
      dataset = open_dataset(dataset)
    self.dataset = dataset
    self.fields = tuple(fields or dataset.fields)
    for f in self.fields:
      dataset.field_spec(f)
    self.meta_keys = tuple(meta_keys)

  def __len__(self) -> int:
    return self.dataset.num_samples

  def __getitem__(self, record_key: int) -> dict:
    i = self.dataset._check_index(record_key)
    record = {f: np.array(self.dataset._slice(i, f)) for f in self.fields}
    record["length"] = np.int32(self.dataset.lengths[i])
    record["index"] = np.int32(i)
    if self.meta_keys:
      meta = self.dataset.meta(i)
      for k in self.meta_keys:
        record[k] = str(meta.get(k, ""))
    return record

  def __getitems__(self, record_keys: Sequence[int]) -> list[dict]:
    return [self[k] for k in record_keys]

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]

  @property
  def features(self) -> dict:
    """Per-record shapes and dtypes (None = variable length)."""
    out = {}
    for f in self.fields:
      trailing, dtype = self.dataset.field_spec(f)
      out[f] = ((None,) + trailing, np.dtype(dtype).name)
    out["length"] = ((), "int32")
    out["index"] = ((), "int32")
    for k in self.meta_keys:
      out[k] = ((), "str")
    return out

  def __repr__(self):
    return (
      f"HiddenStateDataSource({self.dataset.path!r}, "
      f"num_records={len(self)}, fields={self.fields})"
    )


def data_source(path: str, **kwargs) -> HiddenStateDataSource:
  """Like `tfds.data_source`, for an egpt_align dataset directory."""
  return HiddenStateDataSource(path, **kwargs)


def is_tfds_data_source(source) -> bool:
  """Whether `source` satisfies TFDS's random-access DataSource protocol.

  Structural (RandomAccessDataSource) always; where TFDS is installed, also
  isinstance against its own runtime protocol (which imports no TensorFlow).
  """
  if not isinstance(source, RandomAccessDataSource):
    return False
  try:
    from tensorflow_datasets.core.data_sources import base
  except ImportError:  # TFDS is the optional [tfds] extra.
    return True
  return isinstance(source, base.DataSource)
