#!/usr/bin/env bash
# The GPU benchmark set of benchmarks/RESULTS.md, one process per part (a part that fails or runs out of time
# does not lose the others' results):
#
#   bash benchmarks/gpu.sh OUTDIR [SECONDS_PER_PART]
#   PARTS="train_f32 train_bf16" bash benchmarks/gpu.sh OUTDIR   # a subset
#   PARTS=sd_bf16 bash benchmarks/gpu.sh OUTDIR                  # only the SD-sized sampler (~6-9 min)
#
#   0. sd_bf16: the Stable-Diffusion-1.x-sized UNet (random weights) on 64x64x4 latents, bfloat16, batch 64/256/16
#      (this order: the stage part runs right after batch 64, and batch 16 tells least, so a time limit cuts it
#      first): images/s, fraction of the bf16 matmul ceiling, compile of the whole scan vs one step, and the
#      synthesize stage (SD-sized VAE decode, PNG writing) against its bare program (benchmarks/sd_sampler.py).
#      JAX only, so it takes 90 % of GPU memory, and it compiles cold (no persistent cache); its own time limit
#      SD_SECONDS (default 480). It runs first: when GPU time is short, it is the part to have. 386 s on an H200
#      (2026-12-04). --step-gflop: the UNet step's FLOPs per image, from `--count-flops` on a CPU, for the
#      TFLOP/s columns where XLA gives no count on the GPU (jax 0.11.2 gave none).
#   1. sampler, config (b) mscmr, float32, batch 1/16/64/256: scan vs Python loop vs PyTorch (small batches
#      show what one XLA program per trajectory saves over a host round trip per step);
#   2. sampler, config (b), bfloat16 compute, batch 64/256/512: scan vs PyTorch under autocast, against the
#      card's bfloat16 matmul ceiling measured in the same process;
#   3. training steps of the mscmr networks, float32 then bfloat16, batch 64/256, ours vs PyTorch.
# Each part writes OUTDIR/<part>.json and OUTDIR/<part>.log.
set -u
out=${1:?usage: bash benchmarks/gpu.sh OUTDIR [SECONDS_PER_PART]}
limit=${2:-300}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# JAX preallocates 75 % of GPU memory by default; PyTorch runs in the same process.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
python=${PYTHON:-python}

parts=" ${PARTS:-sd_bf16 sampler_f32 sampler_bf16 train_f32 train_bf16} "

part() {
  local name=$1; shift
  [[ $parts == *" $name "* ]] || return 0
  echo "== $name: $*"
  timeout "${PART_SECONDS:-$limit}" "$python" "$@" --json="$out/$name.json" 2>&1 | tee "$out/$name.log" \
    | grep -v "^WARNING\|^I0000\|^W0000"
  echo "== $name: exit ${PIPESTATUS[0]}"
}

PART_SECONDS=${SD_SECONDS:-480} XLA_PYTHON_CLIENT_MEM_FRACTION=${SD_MEM_FRACTION:-0.9} JAX_COMPILATION_CACHE_DIR= \
  part sd_bf16 -m benchmarks.sd_sampler --batches=64,256,16 --dtype=bfloat16 --repeats=3 --budget-s=40 \
  --stage-batch=64 --stage-batches=4 --step-gflop=781.7

# Each framework in its own process; on a GPU OpenMP's waiting policy does not matter, so torch runs once.
part sampler_f32 -m benchmarks.sampler --configs=mscmr --batches=1,16,64,256 --repeats=5 --omp-policies=passive
part sampler_bf16 -m benchmarks.sampler --configs=mscmr --batches=64,256,512 --impls=scan,torch --dtype=bfloat16 \
  --repeats=5 --omp-policies=passive
part train_f32 -m benchmarks.train_step --configs=mscmr --batches=64,256 --repeats=5 --omp-policies=passive
part train_bf16 -m benchmarks.train_step --configs=mscmr --batches=64,256 --repeats=5 --dtype=bfloat16 \
  --omp-policies=passive
