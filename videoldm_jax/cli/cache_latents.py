r"""videoldm-cache-latents: encode a video dataset once with a model's frozen VAE.

  videoldm-cache-latents --model=/ckpt/sd15 --tfds_name=procedural_driving/tiny \
      --tfds_data_dir=work/tfds --output=work/cache/driving_tiny
  videoldm-cache-latents --model=work/tiny_ldm --procedural_clips=256 --num_frames=8 \
      --height=32 --width=32 --output=work/cache/procedural

Records hold the scaled posterior mean latents (T, h, w, C), the caption's text
embeddings (with --text) and the scalar fields of each example. The cache remembers the
VAE (config, scale factor, weight fingerprint) and refuses to serve another.
"""

import sys

from absl import app, flags, logging

from videoldm_jax.cli import check_at_least, check_seed, output_path, run_app
from videoldm_jax.data.procedural import make_clip

_MODEL = flags.DEFINE_string("model", None, "converted model folder (its VAE encodes)")
_TFDS = flags.DEFINE_string("tfds_name", None, "TFDS dataset name[/config] (ArrayRecord)")
_TFDS_DIR = flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir")
_SPLIT = flags.DEFINE_string("split", "train", "TFDS split")
_PROC = flags.DEFINE_integer("procedural_clips", 0, "cache this many built-in procedural "
                             "clips instead of a TFDS dataset")
_FRAMES = flags.DEFINE_integer("num_frames", 8, "--procedural_clips: frames per clip")
_HEIGHT = flags.DEFINE_integer("height", 64, "--procedural_clips: height")
_WIDTH = flags.DEFINE_integer("width", 64, "--procedural_clips: width")
_SEED = flags.DEFINE_integer("seed", 0, "--procedural_clips: seed")
_TEXT = flags.DEFINE_bool("text", True, "also cache text embeddings of the captions")
_BATCH = flags.DEFINE_integer("batch_size", 8, "clips encoded per step")
_SHARDS = flags.DEFINE_integer("num_shards", 4, "ArrayRecord files to write")
_OUTPUT = flags.DEFINE_string("output", None, "cache folder (must not hold a cache)")


def main(argv):
  del argv  # (run_app refuses positional arguments)
  logging.set_verbosity(logging.WARNING)  # Orbax reports every file at INFO
  if _MODEL.value is None or _OUTPUT.value is None:
    raise app.UsageError("--model and --output are required")
  if bool(_TFDS.value) == bool(_PROC.value):
    raise app.UsageError("give exactly one of --tfds_name and --procedural_clips")
  check_at_least(("batch_size", _BATCH.value, 1), ("procedural_clips", _PROC.value, 0),
                 ("num_frames", _FRAMES.value, 1), ("num_shards", _SHARDS.value, 1))
  check_seed("seed", _SEED.value)
  output_path(_OUTPUT.value, "output", folder=True)
  # Imported here, not above: the usage errors above and --help exit before JAX loads
  # (~1 s).
  from videoldm_jax import pretrained
  from videoldm_jax.data.cache_latents import cache_examples
  from videoldm_jax.pipelines import sampling
  configs = pretrained.load(_MODEL.value, weights=False)  # (refusals before the weights)
  f = sampling.size_multiple(configs.unet_config, configs.vae_config)
  if _PROC.value and (_HEIGHT.value % f or _WIDTH.value % f
                      or min(_HEIGHT.value, _WIDTH.value) < 1):
    # (a 30-row frame was encoded to 7 latent rows, which no 2-level UNet takes)
    raise app.UsageError(f"--height={_HEIGHT.value} --width={_WIDTH.value}: must be "
                         f"positive multiples of {f} for {_MODEL.value} (VAE factor x "
                         "2^(UNet levels - 1))")
  model, tokenizer = pretrained.load_with_tokenizer(_MODEL.value)
  if _PROC.value:
    def examples():
      for i in range(_PROC.value):
        video, labels, caption = make_clip(i, _FRAMES.value, _HEIGHT.value, _WIDTH.value,
                                           seed=_SEED.value)
        yield {"video": video, "caption": caption, "index": i, **labels}
    source, total, it = f"procedural seed {_SEED.value}", _PROC.value, examples()
  else:
    import tensorflow_datasets as tfds  # only needed for TFDS sources
    ds = tfds.data_source(_TFDS.value, data_dir=_TFDS_DIR.value, split=_SPLIT.value,
                          download=False)
    source, total = f"tfds {_TFDS.value} {_SPLIT.value}", len(ds)
    it = (ds[i] for i in range(total))
  info = cache_examples(model, it, _OUTPUT.value, num_examples=total,
                        batch_size=_BATCH.value, tokenizer=tokenizer if _TEXT.value else None,
                        num_shards=_SHARDS.value, source=source)
  print(f"wrote {info['num_records']} records of latents {info['latent_shape']} to "
        f"{_OUTPUT.value}", file=sys.stderr)


def run():
  run_app(main, __name__)


if __name__ == "__main__":
  run()
