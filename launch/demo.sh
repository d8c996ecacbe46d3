#!/usr/bin/env bash
# The main job on built-in defaults. Creates .venv when missing, installs the package,
# then, at toy scale on the CPU:
#  1. makes a tiny randomly initialised text-to-image LDM and samples an image from it
#     (tokenizer -> CLIP -> UNet with classifier-free guidance -> DPM-Solver++(2M) ->
#     VAE decoder -> PNG);
#  2. trains an image LDM (the whole tiny UNet) on the frames of the built-in
#     procedural_driving dataset, as the paper does before adding temporal layers;
#  3. trains the key-frame stage on top of it (temporal layers only, image model
#     frozen; a re-run resumes from the last checkpoints);
#  4. samples videos from the exported video model to mp4 + gif.
#   bash launch/demo.sh                  # writes work/demo/sample.png
#   WORK=/tmp/demo bash launch/demo.sh   # elsewhere
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WORK=${WORK:-work/demo}
if [ ! -x .venv/bin/python ]; then
  echo "[demo.sh] creating .venv" >&2
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
echo "[demo.sh] installing videoldm_jax" >&2
python -m pip install --quiet --disable-pip-version-check -e .
mkdir -p "$WORK"
if [ ! -f "$WORK/tiny_ldm/model_index.json" ]; then
  echo "[demo.sh] initialising a tiny random image LDM in $WORK/tiny_ldm" >&2
  videoldm-init-random --config=configs/image_tiny.py --output="$WORK/tiny_ldm"
fi
echo "[demo.sh] sampling" >&2
videoldm-sample-image --model="$WORK/tiny_ldm" \
  --prompt="a dash-cam view of a highway at night" --negative_prompt="blurry" \
  --sampler=dpmpp_2m --steps=20 --guidance_scale=5 --seed=0 --height=64 --width=64 \
  --output="$WORK/sample.png"
echo "[demo.sh] training the image LDM on dash-cam frames (configs/image_ldm_tiny.py)" >&2
videoldm-train --config=configs/image_ldm_tiny.py --workdir="$WORK/image_ldm_tiny"
IMAGE=$(ls -d "$WORK"/image_ldm_tiny/export/step_* | sort -t_ -k2 -n | tail -1)
echo "[demo.sh] training the key-frame stage on top of it (configs/keyframe_tiny.py)" >&2
videoldm-train --config=configs/keyframe_tiny.py --config.image_model="$IMAGE" \
  --workdir="$WORK/keyframe_tiny"
EXPORT=$(ls -d "$WORK"/keyframe_tiny/export/step_* | sort -t_ -k2 -n | tail -1)
echo "[demo.sh] sampling videos from $EXPORT" >&2
videoldm-sample --model="$EXPORT" --prompt="a dash-cam view of a road at night" \
  --num_frames=16 --height=32 --width=32 --num_videos=4 --steps=25 \
  --output="$WORK/videos/night.mp4"
echo "[demo.sh] done: $WORK/sample.png, $WORK/videos/night.mp4 (+ .gif)," \
  "training samples in $WORK/{image_ldm,keyframe}_tiny/samples, TensorBoard logs in" \
  "$WORK/{image_ldm,keyframe}_tiny/tb" >&2
