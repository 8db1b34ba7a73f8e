"""Plain numpy versions of the library's math, for tests to compare with."""

import numpy as np


def cosine(a, b) -> float:
  """Cosine of two vectors with torch.nn.functional.normalize's eps."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  a = a / max(np.linalg.norm(a), 1e-12)
  b = b / max(np.linalg.norm(b), 1e-12)
  return float(np.dot(a, b))
