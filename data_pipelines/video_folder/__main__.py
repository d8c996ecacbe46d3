"""CLI: python -m data_pipelines.video_folder --source=DIR --data_dir=DIR [--captions=FILE]

Builds the `video_folder` TFDS dataset (see builder.py). Prints one summary line on
stderr; exits 1 with one clear message when nothing usable was found or an input is bad.
"""

import argparse
import contextlib
import logging
import sys

__all__ = ["main", "add_decode_args", "decode_kwargs", "run_build"]


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m data_pipelines.video_folder",
      description="Build the video_folder TFDS dataset (array_record) from a folder of "
                  "videos. Unusable files are skipped and listed in skipped.json.")
  p.add_argument("--source", required=True, help="folder walked for video files")
  p.add_argument("--data_dir", required=True, help="TFDS data_dir to write into")
  p.add_argument("--captions", default=None,
                 help="CSV (path,caption) or JSONL ({path, caption}) file; optional")
  add_decode_args(p)
  p.add_argument("--overwrite", action="store_true", help="replace an existing build")
  return p


def add_decode_args(p: argparse.ArgumentParser):
  """The decoding options (builder.DECODE_OPTIONS), shared by the local-video CLIs."""
  p.add_argument("--max_frames", type=int, default=64,
                 help="most frames stored per video; 0 keeps all (default 64)")
  rate = p.add_mutually_exclusive_group()
  rate.add_argument("--frame_stride", type=int, default=1, help="keep every n-th frame")
  rate.add_argument("--target_fps", type=float, default=None,
                    help="keep a frame every round(source fps / target fps) source "
                    "frames, picked by timestamp (even in time in variable-rate videos)")
  p.add_argument("--resize_short_side", type=int, default=None,
                 help="downscale so the shorter side has this many pixels")
  p.add_argument("--min_frames", type=int, default=4,
                 help="skip videos with fewer stored frames (default 4)")


def decode_kwargs(args: argparse.Namespace) -> dict:
  """The parsed `add_decode_args` options as builder keyword arguments."""
  return dict(max_frames=args.max_frames or None, frame_stride=args.frame_stride,
              target_fps=args.target_fps, resize_short_side=args.resize_short_side,
              min_frames=args.min_frames)


def run_build(build_call, package: str) -> int:
  """Runs `build_call()` (returns the built builder) for a CLI: `package`'s summary
  line on stderr, the dataset's folder on stdout, one-line errors and exit status 1
  for bad input."""
  # Root at WARNING keeps TFDS's INFO chatter out; our own logger at INFO so the
  # builder's summary line reaches stderr even when nothing was skipped.
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger(package).setLevel(logging.INFO)
  from data_pipelines.video_folder import builder as vf  # slow import (TFDS): after --help

  try:
    # TFDS prints its progress with print(); keep stdout for the result path alone.
    with contextlib.redirect_stdout(sys.stderr):
      b = build_call()
  except (vf.NoUsableVideoError, FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(b.data_dir)  # stdout: where the dataset is, for scripts
  return 0


def main(argv=None) -> int:
  args = _parser().parse_args(argv)

  def build_call():
    from data_pipelines.video_folder import builder as vf
    return vf.build(args.source, args.data_dir, args.captions, overwrite=args.overwrite,
                    **decode_kwargs(args))
  return run_build(build_call, "data_pipelines.video_folder")


if __name__ == "__main__":
  sys.exit(main())
