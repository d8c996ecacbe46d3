"""A built-in, deterministic, procedural "dash-cam" video source.

Used by the trainer (and tests) until the real TFDS pipeline lands: no files, no
downloads, and every clip is a pure function of (seed, index, num_frames, height, width).

Scene model: a pinhole camera at lane height looks down a straight 3-lane road. A ground
point at depth z (z = 1 on the bottom image row, infinite at the horizon) and lateral
position x (in lane widths) lands on row  hy + (H - hy) / z  and column
cx + f * (x - cam_x) / z. The ego car drives forward, so the dashed lane markings slide
towards the camera; other cars sit in their own lanes and approach (or recede) at their
own rates, growing as 1 / z. All drawing is vectorised numpy over (T, H, W).

Scene parameters are drawn in a fixed order and number, independent of T, H and W, so a
longer clip extends a shorter one and a larger one shows the same scene.
"""

import operator

import numpy as np

MAX_CARS = 3
LANE_CENTRES = np.array([-1.0, 0.0, 1.0])  # lane widths; road edges at +-1.5
ROAD_HALF_WIDTH = 1.5
DASH_PERIOD, DASH_DUTY = 2.0, 0.45  # depth units; fraction of the period that is painted
CAR_WIDTH, CAR_HEIGHT = 0.55, 0.45  # lane widths (~1.9 m wide, ~1.6 m tall)
FOCAL_FRACTION = 0.5  # f = 0.5 * W: two lane widths span the bottom row, like a dash-cam

# (day, night) palettes, RGB in [0, 255].
_PALETTE = {
  "sky_top": ((60, 120, 200), (4, 6, 20)),
  "sky_horizon": ((175, 205, 235), (25, 30, 55)),
  "grass": ((75, 125, 60), (12, 20, 14)),
  "road": ((95, 95, 100), (28, 28, 32)),
  "white": ((235, 235, 235), (150, 150, 150)),
  "yellow": ((230, 190, 40), (140, 115, 30)),
  "window": ((35, 45, 60), (8, 10, 14)),
  "tail_light": ((150, 20, 20), (255, 40, 30)),
}
_CAR_COLOURS = np.array([(200, 30, 30), (30, 60, 180), (230, 230, 230), (40, 40, 40),
                         (200, 160, 30), (30, 140, 70), (150, 150, 160), (120, 60, 150)],
                        np.float32)
_COUNT_WORDS = ("no other cars", "one car", "two cars", "three cars")
_CAPTIONS = (
  "dash-cam video of a three-lane highway {when}, {count} on the road",
  "driving on a highway {when} with {count} ahead",
  "front camera footage {when}: straight road, {count} in view",
)


def _colour(name: str, night: int) -> np.ndarray:
  return np.array(_PALETTE[name][night], np.float32)


def _scene(seed: int, index: int) -> dict:
  """All random choices for clip `index`, drawn in a fixed order from (seed, index)."""
  if seed < 0 or index < 0:
    raise ValueError(f"procedural.make_clip: seed and index must be >= 0, got {seed}, {index}")
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
  # Python floats and float32 arrays throughout: a float64 numpy scalar would silently
  # promote every (T, H, W, 3) intermediate to float64 and double the drawing time.
  s = {
    "night": int(rng.integers(2)),
    "num_cars": int(rng.integers(MAX_CARS + 1)),
    "horizon": float(rng.uniform(0.38, 0.5)),  # fraction of the height
    "cam_x": float(rng.integers(-1, 2) + rng.uniform(-0.2, 0.2)),  # ego lane + wobble
    "ego_speed": float(rng.uniform(0.15, 0.4)),  # depth units per frame
    "dash_phase": float(rng.uniform(0.0, DASH_PERIOD)),
    "caption_template": int(rng.integers(len(_CAPTIONS))),
    "stars": rng.uniform(size=(12, 2)),
    # Per car, always MAX_CARS of them so the draw order never depends on num_cars. Each
    # car gets its own lane (a permutation), so no car can hide right behind another.
    "car_lane": LANE_CENTRES[rng.permutation(MAX_CARS)].astype(np.float32),
    "car_z0": rng.uniform(1.8, 6.0, MAX_CARS).astype(np.float32),
    # Approach rate per frame: z(t) = z_min + (z0 - z_min) * exp(-rate * t); negative
    # rates recede. Exponential, so cars keep moving but never drive through the camera.
    "car_rate": rng.uniform(-0.03, 0.12, MAX_CARS).astype(np.float32),
    "car_colour": _CAR_COLOURS[rng.integers(len(_CAR_COLOURS), size=MAX_CARS)],
  }
  return s


def _fog(colour, z, haze, night):
  """Blends `colour` (..., 3) towards the horizon haze with depth z (...,)."""
  w = np.exp(-(np.minimum(z, 1e3) - 1.0) / (10.0 if night else 14.0))[..., None]
  return colour * w + haze * (1.0 - w)


def make_clip(index: int, num_frames: int, height: int, width: int, seed: int = 0):
  """Renders clip `index` of the stream `seed`.

  Returns (video, labels, caption): video (num_frames, height, width, 3) uint8; labels
  {'time_of_day': 0 day / 1 night, 'crowdedness': number of other cars 0..3}; caption a
  short English description consistent with the labels.
  """
  if num_frames < 1 or height < 8 or width < 8:
    raise ValueError(f"procedural.make_clip: need num_frames >= 1 and height, width >= 8, "
                     f"got {num_frames}, {height}, {width}")
  s = _scene(seed, index)
  night, T, H, W = s["night"], num_frames, height, width
  hy, cx, f = s["horizon"] * H, 0.5 * W, FOCAL_FRACTION * W
  haze = _colour("sky_horizon", night)
  t = np.arange(T, dtype=np.float32)
  yc = np.arange(H, dtype=np.float32) + 0.5  # pixel centres
  xc = np.arange(W, dtype=np.float32) + 0.5

  # Per row: normalised ground disparity d = 1 / z (<= 0 above the horizon).
  d = (yc - hy) / (H - hy)
  ground = d > 0
  z = np.where(ground, 1.0 / np.maximum(d, 1e-6), np.inf)  # (H,)
  px_per_lane = f * np.maximum(d, 1e-6)  # screen pixels per lane width on each row
  xw = s["cam_x"] + (xc[None, :] - cx) / px_per_lane[:, None]  # (H, W) world lateral

  # Static background (H, W, 3): sky gradient, grass, road, solid edge lines.
  u = np.clip(yc / hy, 0.0, 1.0)[:, None, None]
  sky = _colour("sky_top", night) * (1 - u) + haze * u
  bg = np.broadcast_to(sky, (H, W, 3)).copy()
  road = ground[:, None] & (np.abs(xw) < ROAD_HALF_WIDTH)
  bg = np.where(ground[:, None, None], _colour("grass", night), bg)
  bg = np.where(road[..., None], _colour("road", night), bg)

  def line_mask(centre, half_width):
    # Lines stay at least ~1 px wide on screen, so distant markings don't vanish.
    dist_px = np.abs(xw - centre) * px_per_lane[:, None]
    return ground[:, None] & (dist_px < np.maximum(half_width * px_per_lane, 0.5)[:, None])

  bg = np.where(line_mask(-ROAD_HALF_WIDTH, 0.05)[..., None], _colour("yellow", night), bg)
  bg = np.where(line_mask(ROAD_HALF_WIDTH, 0.05)[..., None], _colour("white", night), bg)
  if night:
    # Headlights: the near road ahead of the ego car is lit, falling off with depth and
    # with lateral distance from the ego lane.
    lit = np.exp(-(np.minimum(z, 1e3)[:, None] - 1.0) / 3.0) \
        * np.exp(-(((xw - s["cam_x"]) / 1.2) ** 2))
    bg = bg * (1.0 + 1.5 * (ground[:, None] & road) * lit)[..., None]
    star = (s["stars"] * [hy * 0.9, W]).astype(int)
    bg[star[:, 0], np.minimum(star[:, 1], W - 1)] = (200, 200, 210)
  bg = np.where(ground[:, None, None], _fog(bg, z[:, None], haze, night), bg)

  # Dashed lane markings (T, H, W): painted where the marking's WORLD depth, which is the
  # camera depth plus distance driven, falls in the painted part of the period. As t grows
  # a given dash is reached at a smaller camera depth, i.e. it moves towards the camera.
  world_z = np.minimum(z, 1e3)[None, :] + s["ego_speed"] * t[:, None] + s["dash_phase"]  # (T, H)
  painted = (np.mod(world_z, DASH_PERIOD) < DASH_PERIOD * DASH_DUTY) & (z < 40.0)[None]
  on_line = line_mask(-0.5, 0.04) | line_mask(0.5, 0.04)  # (H, W)
  dash = painted[:, :, None] & on_line[None]
  dash_colour = _fog(np.broadcast_to(_colour("white", night), (H, 3)), z, haze, night)
  video = np.where(dash[..., None], dash_colour[None, :, None, :], bg[None])  # (T, H, W, 3)

  n = s["num_cars"]
  if n:
    lane = s["car_lane"][:n]
    # Nearest allowed depth keeps the whole car (half-width 0.275 < 0.3 lanes) inside the
    # frame horizontally, so the 'crowdedness' label counts visible cars: at depth z the
    # frame's half-width spans (W / 2) * z / f lanes.
    z_min = np.maximum(1.6, (np.abs(lane - s["cam_x"]) + 0.3) * f / (0.5 * W))
    # A start nearer than z_min put a far-lane car outside the frame (still counted), and
    # a receding one then moved towards the camera, through it.
    z0 = np.maximum(s["car_z0"][:n], z_min)
    car_z = z_min + (z0 - z_min) * np.exp(-s["car_rate"][:n] * t[:, None])
    car_z = np.minimum(car_z, 60.0)  # (T, n)
    # Painter's algorithm: per frame, draw the farthest car first.
    order = np.argsort(-car_z, axis=1)
    for rank in range(n):
      c = order[:, rank]  # (T,) which car is drawn at this rank in each frame
      cz = car_z[np.arange(T), c]
      scale = f / cz  # pixels per lane width at the car's depth
      centre = cx + (lane[c] - s["cam_x"]) * scale
      half_w, height_px = 0.5 * CAR_WIDTH * scale, CAR_HEIGHT * scale
      bottom = hy + (H - hy) / cz
      top = bottom - height_px

      left, right = centre - half_w, centre + half_w
      # Composite only inside the car's bounding box over all frames: cars are small, and
      # full-frame selects per car dominated the runtime.
      ya, yb = max(0, int(np.floor(top.min()))), min(H, int(np.ceil(bottom.max())) + 1)
      xa, xb = max(0, int(np.floor(left.min()))), min(W, int(np.ceil(right.max())) + 1)
      if ya >= yb or xa >= xb:
        continue
      ys_c, xs_c = yc[ya:yb], xc[xa:xb]

      def box(y0, y1, x0, x1):  # (T,) bounds -> (T, yb-ya, xb-xa) mask on pixel centres
        ys = (ys_c[None] >= y0[:, None]) & (ys_c[None] < y1[:, None])
        xs = (xs_c[None] >= x0[:, None]) & (xs_c[None] < x1[:, None])
        return ys[:, :, None] & xs[:, None, :]

      inset = 0.12 * half_w
      body = box(top, bottom, left, right)
      window = box(top + 0.12 * height_px, top + 0.42 * height_px, left + inset, right - inset)
      lights_y0, lights_y1 = top + 0.55 * height_px, top + 0.7 * height_px
      lights = box(lights_y0, lights_y1, left + inset, left + 0.45 * half_w) \
          | box(lights_y0, lights_y1, right - 0.45 * half_w, right - inset)
      dim = 0.45 if night else 1.0  # car bodies are barely lit at night
      block = video[:, ya:yb, xa:xb]
      for mask, colour in ((body, s["car_colour"][c] * dim),
                           (window, np.broadcast_to(_colour("window", night), (T, 3))),
                           (lights, np.broadcast_to(_colour("tail_light", night), (T, 3)))):
        colour = _fog(colour, cz, haze, night)  # (T, 3)
        block = np.where(mask[..., None], colour[:, None, None, :], block)
      video[:, ya:yb, xa:xb] = block

  video = np.clip(np.round(video), 0, 255).astype(np.uint8)
  labels = {"time_of_day": night, "crowdedness": n}
  caption = _CAPTIONS[s["caption_template"]].format(
      when="at night" if night else "during the day", count=_COUNT_WORDS[n])
  return video, labels, caption


class ClipIterator:
  """Endless batches of procedural clips, sharded over processes, resumable.

  Process p of P takes consecutive blocks of B global clip indices: its k-th batch holds
  indices k * B * P + p * B + j for j < B. So the P processes' k-th batches together
  cover exactly the global range [k * B * P, (k + 1) * B * P), in process order:
  disjoint, and their concatenation is what a single process with batch B * P sees.

  Each batch is a dict:
    'video'        uint8 (B, T, H, W, 3)
    'time_of_day'  int32 (B,)   0 day, 1 night
    'crowdedness'  int32 (B,)   number of other cars, 0..3
    'caption'      np.ndarray of str (B,)
    'index'        int64 (B,)   global clip index, for debugging and tests
    'labels'       int32 (B,)   with label_field 'time_of_day' or 'crowdedness': that
                                field, the class labels of a class-conditional UNet
  """

  LABEL_FIELDS = ("time_of_day", "crowdedness")

  def __init__(self, batch_size: int, num_frames: int, height: int, width: int,
               seed: int = 0, process_index: int = 0, process_count: int = 1,
               label_field: str | None = None):
    if label_field is not None and label_field not in self.LABEL_FIELDS:
      raise ValueError(f"config.data.label_field={label_field!r}: procedural clips have "
                       f"the integer fields {self.LABEL_FIELDS}")
    self.label_field = label_field
    if batch_size < 1:
      raise ValueError(f"ClipIterator: batch_size must be >= 1, got {batch_size}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"ClipIterator: need 0 <= process_index < process_count, got "
                       f"{process_index} of {process_count}")
    self.batch_size, self.num_frames = int(batch_size), int(num_frames)
    self.height, self.width, self.seed = int(height), int(width), int(seed)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self._next_batch = 0  # global batch (step) this process renders next

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    # Process p renders its block of the global batch: concatenated in process order the
    # blocks are the batch one process with the global batch size would render.
    b, P = self.batch_size, self.process_count
    indices = (self._next_batch * b * P + self.process_index * b
               + np.arange(b, dtype=np.int64))
    clips = [make_clip(int(i), self.num_frames, self.height, self.width, self.seed)
             for i in indices]
    self._next_batch += 1
    return {
      "video": np.stack([v for v, _, _ in clips]),
      "time_of_day": np.array([lab["time_of_day"] for _, lab, _ in clips], np.int32),
      "crowdedness": np.array([lab["crowdedness"] for _, lab, _ in clips], np.int32),
      "caption": np.array([cap for _, _, cap in clips], dtype=str),
      "index": indices,
      **({"labels": np.array([lab[self.label_field] for _, lab, _ in clips], np.int32)}
         if self.label_field else {}),
    }

  def get_state(self) -> dict:
    """JSON-serialisable position: the next global batch, plus what it is valid for. It
    is the same on every process, and valid for any split of the same global batch."""
    return {"next_batch": self._next_batch, "seed": self.seed,
            "global_batch": self.batch_size * self.process_count}

  def set_state(self, state: dict) -> None:
    """Restores `get_state()` output (from any process, of a run with any number of
    processes and the same global batch); the next batch continues exactly there."""
    value = state.get("next_batch") if isinstance(state, dict) else None
    try:  # an integer (NumPy's too), not a float to truncate (2.7) nor a bool
      next_batch = -1 if isinstance(value, bool) else operator.index(value)
    except TypeError:
      next_batch = -1
    if next_batch < 0:
      raise ValueError(f"ClipIterator.set_state: expected a dict with an integer "
                       f"'next_batch' >= 0, got {state!r}")
    if int(state.get("seed", self.seed)) != self.seed:
      raise ValueError(f"ClipIterator.set_state: state is for seed {state['seed']}, this "
                       f"iterator uses seed {self.seed}")
    global_batch = self.batch_size * self.process_count
    if int(state.get("global_batch", global_batch)) != global_batch:
      raise ValueError(f"ClipIterator.set_state: state {state!r} is for a global batch of "
                       f"{state.get('global_batch')}; this iterator (process "
                       f"{self.process_index} of {self.process_count}) reads {global_batch}")
    self._next_batch = next_batch
