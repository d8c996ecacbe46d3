"""Builds a procedural_driving config into a data directory.

  python -m data_pipelines.procedural_driving --config=tiny --data_dir=/tmp/tfds

Prints where the array_record files went and the split sizes. No network is used.
With --write_clips=DIR the clips of --split are also written as uint8 .npy files
(T, H, W, 3), e.g. held-out reference clips for videoldm-eval; --height/--width resize
them (and center-crop) as the training pipeline does, so that they match generated
clips of that size (an FVD between sizes measures the resize, not the model).
"""

import argparse
import time
from pathlib import Path

import numpy as np

from data_pipelines.procedural_driving.procedural_driving import BUILDER_CONFIGS, build
from videoldm_jax.data.grain_pipeline import resize_and_crop


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m data_pipelines.procedural_driving",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="tiny", choices=[c.name for c in BUILDER_CONFIGS])
  parser.add_argument("--data_dir", required=True, help="TFDS data directory to build into")
  parser.add_argument("--overwrite", action="store_true",
                      help="rebuild even if the dataset is already there")
  parser.add_argument("--write_clips", default="", help="also write the clips of --split "
                      "as .npy files into this folder")
  parser.add_argument("--split", default="validation", choices=["train", "validation"])
  parser.add_argument("--max_clips", type=int, default=0, help="0: all clips of the split")
  parser.add_argument("--height", type=int, default=0, help="resize written clips to this "
                      "height (with --width; 0: as stored)")
  parser.add_argument("--width", type=int, default=0, help="resize written clips to this width")
  args = parser.parse_args(argv)
  if (args.height > 0) != (args.width > 0):
    parser.error("--height and --width go together")
  start = time.perf_counter()
  builder = build(args.config, args.data_dir, overwrite=args.overwrite)
  splits = {name: split.num_examples for name, split in builder.info.splits.items()}
  print(f"procedural_driving/{args.config}: {splits} in {builder.data_dir} "
        f"({time.perf_counter() - start:.1f} s)")
  if args.write_clips:
    out = Path(args.write_clips)
    out.mkdir(parents=True, exist_ok=True)
    source = builder.as_data_source(args.split)
    n = len(source) if args.max_clips <= 0 else min(args.max_clips, len(source))
    size = "stored size"
    for i in range(n):
      clip = np.asarray(source[i]["video"], np.uint8)
      if args.height:
        clip = resize_and_crop(clip, args.height, args.width, "center")
      np.save(out / f"{args.split}_{i:05d}.npy", clip)
      size = f"{clip.shape[1]}x{clip.shape[2]}"
    print(f"wrote {n} {args.split} clips ({size}) to {out}")


if __name__ == "__main__":
  main()
