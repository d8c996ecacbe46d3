#!/usr/bin/env bash
# Issue 8's accelerator benchmarks in one call on a GPU machine: the SD 1.5-sized
# key-frame train step (bench/workloads.py "SD15": T = 16, 40 x 64 latents) in bf16,
# temporal and full, with cuDNN's fused attention ("auto" on GPUs) and with XLA's
# formula ("plain"), a profile of the temporal step (bench/profile_step.py: time per
# XLA op from the GPU kernels' hlo_op), the temporal step at four clips per step,
# bf16 against float32 (bench/bf16_check.py),
# DDIM sampling of the same model, and W2 in bf16. Cases run in priority order, each
# in its own process under its own time limit (CASE_LIMIT seconds; an SD15 case took
# 165-170 s on an H200, two minutes of it compiling), and append their JSON lines to
# $OUT/results.jsonl as they finish, so a run cut short still reports what it
# measured; CASES="name ..." runs only those. MFU is against a bf16 8192^3 matmul
# measured in each process.
#
#   OUT=work/gpu_run bash bench/gpu_run.sh          # OUT defaults to work/gpu_run
#
# Exits 1 when a case failed or ran out of time (its lines so far are still kept).
#
# The machine's own Python and JAX are used (no install). Packages it lacks travel as
# wheels in .whl/ (ml_collections, grain, array_record, portpicker: bench/README.md
# says how to fetch them) and are installed into /tmp/site.
set -u
# The cases below, in order; CASES names some of them. A misspelt name ran nothing and
# exited 0 (a GPU loan spent on starting the machine); it is refused before anything runs.
KNOWN_CASES="sd15_temporal_auto sd15_full_auto sd15_profile sd15_temporal_b4 bf16_check
  sd15_temporal_plain sd15_sample w2_bf16"
CASES=${CASES:-all}  # or a space-separated list of case names
if [ "$CASES" != all ]; then
  for name in $CASES; do
    [[ " $(echo $KNOWN_CASES) " == *" $name "* ]] || {
      echo "gpu_run.sh: CASES: unknown case '$name'; known: all or" $KNOWN_CASES >&2; exit 2; }
  done
fi
OUT=${OUT:-work/gpu_run}
case $OUT in /*) ;; *) OUT=$PWD/$OUT ;; esac  # (from the caller's folder)
cd "$(dirname "$0")/.."  # the package, bench/ and .whl/ are found from the checkout
mkdir -p "$OUT"
: > "$OUT/results.jsonl"  # this run's lines only (an earlier run's were shown as new)
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The package's XLA:CPU default flag (videoldm_jax/xla_flags.py) is left out: a flag
# this XLA build does not know would stop the process.
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} VIDEOLDM_JAX_XLA_DEFAULTS=0 PYTHONUNBUFFERED=1
CASE_LIMIT=${CASE_LIMIT:-240}
# One persistent compilation cache for the cases of this run (fresh, so that compile_s
# is a compile): the profile runs the program of the temporal case (two minutes of
# compiling on the H200) and loads it from here.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d /tmp/videoldm_jax_cache.XXXXXX)}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
      --format=csv 2>&1
  $PY -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__); \
print(jax.devices())" 2>&1; } | tee "$OUT/env.txt"
$PY -c "import bench.train_step" || { echo "imports failed"; exit 1; }

run_case() {  # name, command...
  local name=$1; shift
  [[ " $(echo $KNOWN_CASES) " == *" $name "* ]] || {
    echo "gpu_run.sh: case $name is not in KNOWN_CASES" >&2; exit 2; }
  [ "$CASES" = all ] || [[ " $CASES " == *" $name "* ]] || return 0
  echo "== $name: $*"
  local t0=$SECONDS
  timeout "$CASE_LIMIT" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  local rc=$?
  grep '^{' "$OUT/$name.out" >> "$OUT/results.jsonl"
  cat "$OUT/$name.out"
  if [ $rc -ne 0 ]; then
    tail -n 25 "$OUT/$name.err"
    FAILED="$FAILED $name"
  fi
  echo "== $name: rc=$rc, $((SECONDS - t0)) s"
}
FAILED=""

TS="$PY -m bench.train_step --dtype=bfloat16 --steps=10 --warmup=3 --stage=keyframe"
run_case sd15_temporal_auto $TS --workload=SD15 --mode=temporal --attention=auto
run_case sd15_full_auto $TS --workload=SD15 --mode=full --attention=auto
run_case sd15_profile $PY -m bench.profile_step --workload=SD15 --mode=temporal \
    --dtype=bfloat16 --top=40
# Four clips per step (the chip holds them: 27.9 GB at one): how far the small batch
# keeps the MFU down.
run_case sd15_temporal_b4 $TS --workload=SD15 --mode=temporal --attention=auto --batch=4
run_case bf16_check $PY -m bench.bf16_check --workload=W2,SD15
run_case sd15_temporal_plain $TS --workload=SD15 --mode=temporal --attention=plain
run_case sd15_sample $PY -m bench.sample --workload=SD15 --dtype=bfloat16 --steps=10 --runs=3
run_case w2_bf16 $TS --workload=W2 --mode=temporal,full
echo "== results"
cat "$OUT/results.jsonl"
if [ -n "$FAILED" ]; then
  echo "== failed or cut off:$FAILED" >&2
  exit 1
fi
