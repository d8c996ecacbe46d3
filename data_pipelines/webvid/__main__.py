"""CLI: python -m data_pipelines.webvid --csv=FILE --videos_root=DIR --data_dir=DIR

Builds the `webvid_local` TFDS dataset (see builder.py) from a WebVid results CSV and
the videos downloaded to `<videos_root>/<page_dir>/<videoid>.mp4`. Prints one summary
line on stderr and the dataset's folder on stdout; exits 1 with one clear message when
nothing usable was found or an input is bad.
"""

import argparse
import sys

from data_pipelines.video_folder.__main__ import add_decode_args, decode_kwargs, run_build

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m data_pipelines.webvid",
      description="Build the webvid_local TFDS dataset (array_record) from a WebVid "
                  "results CSV and local videos. Missing or unusable videos are skipped "
                  "and listed in skipped.json.")
  p.add_argument("--csv", required=True,
                 help="WebVid results CSV (columns videoid, page_dir, name, ...)")
  p.add_argument("--videos_root", required=True,
                 help="folder holding <page_dir>/<videoid>.mp4")
  p.add_argument("--data_dir", required=True, help="TFDS data_dir to write into")
  p.add_argument("--max_rows", type=int, default=None,
                 help="read only the first N rows of the CSV (a subset); default all")
  add_decode_args(p)
  p.add_argument("--overwrite", action="store_true", help="replace an existing build")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)

  def build_call():
    from data_pipelines.webvid import builder  # slow import (TFDS): after --help
    return builder.build(args.csv, args.videos_root, args.data_dir,
                         overwrite=args.overwrite, max_rows=args.max_rows,
                         **decode_kwargs(args))
  return run_build(build_call, "data_pipelines.webvid")


if __name__ == "__main__":
  sys.exit(main())
