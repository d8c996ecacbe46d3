"""Classifier-free guidance of a class-conditional model, at toy scale: day vs night.

Trains the tiny image LDM of the demo (configs/image_ldm_tiny.py, on the demo's
autoencoder and procedural_driving data; WORK=work/demo by default: run the demo first)
as a class-conditional model of the clips' `time_of_day` label (0 day, 1 night) with no
text encoder, a third class as its null class (`null_class_label=2`, labels dropped to
it with probability cond_drop_prob = 0.1), then samples each class at several guidance
scales. A night frame is darker than a day frame (headlights on an unlit road), so the
mean luma of a sample says which class it shows: the threshold is the midpoint of the
mean lumas of real day and real night frames (clips the training never drew). One JSON
line per scale: mean luma per class, their gap, and the fraction of samples on their
label's side of the threshold.

  python -m bench.class_guidance --work=work/demo --scales=1,2,4
"""

import argparse
import dataclasses
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import emit  # noqa: E402
from videoldm_jax import pretrained  # noqa: E402
from videoldm_jax.config_files import load_sibling  # noqa: E402
from videoldm_jax.data.procedural import make_clip  # noqa: E402
from videoldm_jax.pipelines import sampling  # noqa: E402
from videoldm_jax.train import loop  # noqa: E402

ROOT = Path(__file__).parents[1]
NULL = 2  # classes 0 day, 1 night, 2 "no class"


def luma(images: np.ndarray) -> np.ndarray:
  """uint8 (..., H, W, 3) -> mean Rec. 601 luma (...,) in [0, 255]."""
  return (np.asarray(images, np.float64) @ [0.299, 0.587, 0.114]).mean(axis=(-1, -2))


def base_model(autoencoder: Path, out: Path) -> Path:
  """The tiny class-conditional model (`configs/image_tiny.py:classes=3`: the demo's
  UNet, 3 classes, no text encoder) with the demo autoencoder's VAE (weights and
  latent scaling), saved to `out` once."""
  if (out / "model_index.json").is_file():
    return out
  model = pretrained.random_image_ldm(
      load_sibling(str(ROOT / "configs" / "x.py"), "image_tiny").get_config("classes=3"))
  ae = pretrained.load(autoencoder)
  model = dataclasses.replace(model, vae_config=ae.vae_config,
                              params={**model.params, "vae": ae.params["vae"]},
                              source=f"bench.class_guidance on {autoencoder}")
  return pretrained.save(out, model)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--work", default="work/demo", help="the demo's WORK folder")
  parser.add_argument("--out", default="", help="workdir (default WORK/class_guidance)")
  parser.add_argument("--train_steps", type=int, default=900)
  parser.add_argument("--scales", default="1,2,4")
  parser.add_argument("--samples", type=int, default=32, help="per class and scale")
  parser.add_argument("--steps", type=int, default=25, help="sampler steps")
  args = parser.parse_args()
  work = Path(args.work)
  out = Path(args.out) if args.out else work / "class_guidance"
  autoencoder = loop.latest_export(work / "autoencoder")
  if autoencoder is None or not (work / "tfds").is_dir():
    raise SystemExit(f"{work}: no autoencoder export or tfds data; run `bash "
                     "launch/demo.sh` first (or point --work at its WORK folder)")

  config = load_sibling(str(ROOT / "configs" / "x.py"), "image_ldm_tiny").get_config()
  config.image_model = str(base_model(autoencoder, out / "base"))
  config.null_class_label = NULL
  config.data.update(data_dir=str(work / "tfds"), label_field="time_of_day")
  config.sample.every = 0
  config.train.num_steps = config.optim.total_steps = args.train_steps
  loop.train_and_evaluate(config, str(out / "image_ldm"))
  model = pretrained.load(loop.latest_export(out / "image_ldm"))
  assert model.training["null_class_label"] == NULL

  # Real frames of clips the training never drew (it reads the 64-clip tiny split).
  h, w = int(config.data.height), int(config.data.width)
  real = {0: [], 1: []}
  for i in range(10_000, 10_200):
    video, labels, _ = make_clip(i, 8, h, w, seed=0)
    real[int(labels["time_of_day"])].append(luma(video).mean())
  day, night = float(np.mean(real[0])), float(np.mean(real[1]))
  threshold = (day + night) / 2

  for scale in [float(s) for s in args.scales.split(",")]:
    options = sampling.SampleOptions(height=h, width=w, num_steps=args.steps,
                                     guidance_scale=scale, seed=0, progress=False)
    got = {label: luma(sampling.generate(model, None, [""] * args.samples, "", options,
                                         class_labels=[label] * args.samples))
           for label in (0, 1)}
    right = np.concatenate([got[0] > threshold, got[1] <= threshold])
    emit({"bench": "class_guidance", "guidance_scale": scale, "samples": args.samples,
          "train_steps": args.train_steps, "sampler_steps": args.steps,
          "day_luma": float(got[0].mean()), "night_luma": float(got[1].mean()),
          "gap": float(got[0].mean() - got[1].mean()), "label_accuracy": float(right.mean()),
          "real_day_luma": day, "real_night_luma": night, "threshold": threshold,
          "device": jax.devices()[0].device_kind})


if __name__ == "__main__":
  main()
