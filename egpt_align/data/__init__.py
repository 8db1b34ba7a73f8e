"""Hidden-state datasets: on-disk format, writer, reader, input pipeline."""

from egpt_align.data import format, pipeline, synthetic  # noqa: A004
from egpt_align.data.format import DatasetFormatError
from egpt_align.data.pipeline import InputPipeline
from egpt_align.data.reader import HiddenStateDataset, open_dataset
from egpt_align.data.writer import DatasetWriter

__all__ = [
  "DatasetFormatError",
  "DatasetWriter",
  "HiddenStateDataset",
  "InputPipeline",
  "format",
  "open_dataset",
  "pipeline",
  "synthetic",
]
