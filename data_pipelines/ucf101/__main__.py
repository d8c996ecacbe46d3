"""CLI: python -m data_pipelines.ucf101 --root=DIR --data_dir=DIR [--split_number=1]

Builds the `ucf101_local/split_<n>` TFDS dataset (see builder.py) from a local UCF-101
(`<root>/UCF-101/`, `<root>/ucfTrainTestlist/`, or --videos_dir / --splits_dir). Prints
one summary line on stderr and the dataset's folder on stdout; exits 1 with one clear
message when a split has no usable video or an input is bad.
"""

import argparse
import sys

from data_pipelines.video_folder.__main__ import add_decode_args, decode_kwargs, run_build

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m data_pipelines.ucf101",
      description="Build the ucf101_local TFDS dataset (array_record; train and test "
                  "of one official partition). Missing or unusable videos are skipped "
                  "and listed in skipped.json.")
  p.add_argument("--root", default=None,
                 help="folder holding UCF-101/ and ucfTrainTestlist/")
  p.add_argument("--videos_dir", default=None,
                 help="the UCF-101 class folders (default <root>/UCF-101)")
  p.add_argument("--splits_dir", default=None,
                 help="classInd.txt and the lists (default <root>/ucfTrainTestlist)")
  p.add_argument("--data_dir", required=True, help="TFDS data_dir to write into")
  p.add_argument("--split_number", type=int, choices=(1, 2, 3), default=1,
                 help="official train/test partition (default 1)")
  add_decode_args(p)
  p.add_argument("--overwrite", action="store_true", help="replace an existing build")
  return p


def main(argv=None) -> int:
  p = _parser()
  args = p.parse_args(argv)
  if args.root is None and not (args.videos_dir and args.splits_dir):
    p.error("give --root, or both --videos_dir and --splits_dir")

  def build_call():
    from data_pipelines.ucf101 import builder  # slow import (TFDS): after --help
    return builder.build(args.root, args.data_dir, split_number=args.split_number,
                         videos_dir=args.videos_dir, splits_dir=args.splits_dir,
                         overwrite=args.overwrite, **decode_kwargs(args))
  return run_build(build_call, "data_pipelines.ucf101")


if __name__ == "__main__":
  sys.exit(main())
