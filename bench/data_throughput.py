r"""Input-pipeline throughput: decoded frames/s and clips/s with 0, 1, 2 Grain workers.

  JAX_PLATFORMS=cpu python -m bench.data_throughput --tfds_config=small --batches=20

Reads the built-in procedural_driving TFDS dataset (built first if missing) through
the trainer's Grain pipeline (clip sampling, resize, random crop, flip) and prints one
JSON line per worker count.
"""

import argparse
import tempfile
import time

from bench import common
from data_pipelines.procedural_driving import build
from videoldm_jax.data.grain_pipeline import make_video_dataset


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tfds_config", default="small")
  ap.add_argument("--data_dir", default=None)
  ap.add_argument("--batch_size", type=int, default=8)
  ap.add_argument("--num_frames", type=int, default=16)
  ap.add_argument("--size", type=int, default=64)
  ap.add_argument("--batches", type=int, default=20)
  ap.add_argument("--workers", default="0,1,2")
  args = ap.parse_args()
  # Before the dataset is built: 0 batches failed on the last batch's shape.
  common.refuse_below(ap, args, batches=1)
  if args.data_dir:
    run(args, args.data_dir)
  else:  # a dataset built for this run only: removed afterwards
    with tempfile.TemporaryDirectory(prefix="tfds_") as data_dir:
      run(args, data_dir)


def run(args, data_dir: str) -> None:
  t0 = time.perf_counter()
  source = build(args.tfds_config, data_dir).as_data_source("train")
  build_s = time.perf_counter() - t0
  for workers in (int(w) for w in args.workers.split(",")):
    it = iter(make_video_dataset(source, batch_size=args.batch_size,
                                 num_frames=args.num_frames, height=args.size,
                                 width=args.size, seed=0, crop="random", hflip=True,
                                 worker_count=workers))
    next(it)  # start-up (worker processes, first reads) is not throughput
    t0 = time.perf_counter()
    for _ in range(args.batches):
      batch = next(it)
    dt = time.perf_counter() - t0
    clips = args.batches * args.batch_size
    common.emit({"bench": "data_throughput", "tfds_config": args.tfds_config,
                 "workers": workers, "clips_per_s": clips / dt,
                 "frames_per_s": clips * args.num_frames / dt,
                 "batch_shape": list(batch["video"].shape), "build_or_reuse_s": build_s,
                 "peak_host_bytes": common.peak_host_rss_bytes()})


if __name__ == "__main__":
  main()
