"""Builds a procedural_driving config into a data directory.

  python -m data_pipelines.procedural_driving --config=tiny --data_dir=/tmp/tfds

Prints where the array_record files went and the split sizes. No network is used.
"""

import argparse
import time

from data_pipelines.procedural_driving.procedural_driving import BUILDER_CONFIGS, build


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m data_pipelines.procedural_driving",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="tiny", choices=[c.name for c in BUILDER_CONFIGS])
  parser.add_argument("--data_dir", required=True, help="TFDS data directory to build into")
  parser.add_argument("--overwrite", action="store_true",
                      help="rebuild even if the dataset is already there")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  builder = build(args.config, args.data_dir, overwrite=args.overwrite)
  splits = {name: split.num_examples for name, split in builder.info.splits.items()}
  print(f"procedural_driving/{args.config}: {splits} in {builder.data_dir} "
        f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
  main()
