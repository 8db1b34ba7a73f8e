"""Procedural scenes: RGB clips of moving and static shapes, and their events.

Everything is drawn from one integer seed (`render(seed)`), so the supply is
unlimited and a split is a seed range (`SPLITS`). A scene is a few coloured
shapes (circle, square, triangle) on a dark background with static grey
clutter; each shape starts in one cell of a 3x3 grid and either stays still
or moves left/right/up/down, slowly or quickly.

`events(frames)` is what an event camera reports for the clip: per pixel, the
log intensity is compared with the level at that pixel's last event, and
every crossing of the contrast threshold emits one event of that sign; the
events between two frames are accumulated into a 2-channel (+, -) event
frame. Nothing that stays still emits events, so static objects are invisible
to the drafter: the cross-modal gap is real.
"""

from __future__ import annotations

import dataclasses

import numpy as np

NUM_FRAMES = 8
SIZE = 64
COLOURS = {
  "red": (220, 40, 40),
  "green": (40, 190, 60),
  "blue": (60, 90, 235),
  "yellow": (230, 220, 50),
  "white": (235, 235, 235),
  "purple": (170, 70, 210),
}
SHAPES = ("circle", "square", "triangle")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "centre", "right")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEEDS = {"slowly": 1, "quickly": 3}  # pixels per frame
CELL_CENTRES = (12, 32, 52)
# The nine start cells' names, row by row (`Thing.cell`).
CELLS = tuple(
  "centre" if (r, c) == (1, 1) else f"{ROWS[r]} {COLS[c]}"
  for r in range(3)
  for c in range(3)
)
BACKGROUND = 60
CONTRAST_THRESHOLD = 0.15  # log-intensity step per event
# Seed ranges of the splits: [start, stop).
SPLITS = {
  "train": (0, 1_000_000),
  "val": (1_000_000, 1_100_000),
  "test": (2_000_000, 2_100_000),
}


@dataclasses.dataclass(frozen=True)
class Thing:
  """One shape: what it is, where it starts, how it moves."""

  colour: str
  shape: str
  row: int  # 0..2, start cell
  col: int  # 0..2
  radius: int
  x0: float  # start centre, pixels
  y0: float
  direction: str | None  # None: static
  speed: str | None  # key of SPEEDS, None when static

  @property
  def moving(self) -> bool:
    return self.direction is not None

  @property
  def cell(self) -> str:
    """Start cell name, e.g. 'top left', 'centre'."""
    return CELLS[3 * self.row + self.col]

  def centre(self, frame: int) -> tuple[float, float]:
    if not self.moving:
      return self.x0, self.y0
    dx, dy = DIRECTIONS[self.direction]
    step = SPEEDS[self.speed] * frame
    return self.x0 + dx * step, self.y0 + dy * step


@dataclasses.dataclass(frozen=True)
class Scene:
  seed: int
  things: tuple[Thing, ...]
  clutter: tuple[tuple[int, int, int, int, int], ...]  # x, y, w, h, grey


def split_of(seed: int) -> str:
  """The split a seed belongs to (ValueError outside every range)."""
  for name, (lo, hi) in SPLITS.items():
    if lo <= seed < hi:
      return name
  raise ValueError(f"seed {seed} is in no split; ranges: {SPLITS}")


def split_seeds(split: str, count: int, offset: int = 0) -> list[int]:
  """`count` consecutive seeds of `split`, starting `offset` into it."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
  lo, hi = SPLITS[split]
  if lo + offset + count > hi:
    raise ValueError(f"split {split!r} holds only {hi - lo} seeds")
  return list(range(lo + offset, lo + offset + count))


def make_scene(seed: int) -> Scene:
  """The scene of `seed` (ground truth only, nothing drawn)."""
  rng = np.random.default_rng([seed, 7])
  n = int(rng.integers(1, 4))
  colours = rng.choice(len(COLOURS), size=n, replace=False)
  cells = rng.choice(9, size=n, replace=False)
  travel = NUM_FRAMES - 1
  things = []
  for c, cell in zip(colours, cells, strict=True):
    row, col = divmod(int(cell), 3)
    radius = int(rng.integers(5, 8))
    x0 = CELL_CENTRES[col] + float(rng.integers(-2, 3))
    y0 = CELL_CENTRES[row] + float(rng.integers(-2, 3))
    direction = speed = None
    if rng.random() < 0.6:
      speed = str(rng.choice(list(SPEEDS)))
      options = []
      for d, (dx, dy) in DIRECTIONS.items():
        x1 = x0 + dx * SPEEDS[speed] * travel
        y1 = y0 + dy * SPEEDS[speed] * travel
        if 4 <= x1 <= SIZE - 4 and 4 <= y1 <= SIZE - 4:
          options.append(d)
      direction = str(rng.choice(options))
    things.append(
      Thing(
        colour=list(COLOURS)[int(c)],
        shape=SHAPES[int(rng.integers(len(SHAPES)))],
        row=row,
        col=col,
        radius=radius,
        x0=x0,
        y0=y0,
        direction=direction,
        speed=speed,
      )
    )
  clutter = tuple(
    (
      int(rng.integers(0, SIZE - 4)),
      int(rng.integers(0, SIZE - 4)),
      int(rng.integers(2, 9)),
      int(rng.integers(2, 9)),
      int(rng.integers(35, 90)),
    )
    for _ in range(int(rng.integers(6, 14)))
  )
  return Scene(seed=seed, things=tuple(things), clutter=clutter)


_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


def mask(thing: Thing, frame: int) -> np.ndarray:
  """Pixels [SIZE, SIZE] (bool) that `thing` covers in `frame`."""
  cx, cy = thing.centre(frame)
  r = thing.radius
  dx, dy = _XX - cx, _YY - cy
  if thing.shape == "circle":
    return dx * dx + dy * dy <= r * r
  if thing.shape == "square":
    return (np.abs(dx) <= r - 1) & (np.abs(dy) <= r - 1)
  # Upward triangle: apex at (cx, cy - r), base at y = cy + r.
  inside_y = (dy >= -r) & (dy <= r)
  half = (dy + r) / 2.0
  return inside_y & (np.abs(dx) <= half)


def draw(scene: Scene) -> np.ndarray:
  """The clip of `scene`: uint8 [NUM_FRAMES, SIZE, SIZE, 3]."""
  canvas = np.full((SIZE, SIZE, 3), BACKGROUND, np.uint8)
  for x, y, w, h, grey in scene.clutter:
    canvas[y : y + h, x : x + w] = grey
  frames = np.repeat(canvas[None], NUM_FRAMES, axis=0)
  for t in range(NUM_FRAMES):
    for thing in scene.things:
      frames[t][mask(thing, t)] = COLOURS[thing.colour]
  return frames


def render(seed: int) -> tuple[Scene, np.ndarray]:
  """(scene, frames) of `seed`."""
  scene = make_scene(seed)
  return scene, draw(scene)


def log_intensity(frames: np.ndarray) -> np.ndarray:
  """Per-pixel log luminance of uint8 RGB frames [..., H, W, 3]."""
  luma = frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
  return np.log1p(luma)


def events(
  frames: np.ndarray, threshold: float = CONTRAST_THRESHOLD
) -> np.ndarray:
  """Event frames of a clip: uint8 [F - 1, 2, H, W] (+ and - counts).

  Each pixel keeps the log level of its last event; whenever the current
  log intensity differs from it by k whole thresholds, k events of that sign
  fire and the level moves by k thresholds (an event camera's rule).
  """
  log_i = log_intensity(frames)
  level = log_i[0].copy()
  out = np.zeros((len(frames) - 1, 2) + log_i.shape[1:], np.uint8)
  for t in range(1, len(frames)):
    k = np.trunc((log_i[t] - level) / threshold)
    level += k * threshold
    out[t - 1, 0] = np.clip(k, 0, 255).astype(np.uint8)
    out[t - 1, 1] = np.clip(-k, 0, 255).astype(np.uint8)
  return out
