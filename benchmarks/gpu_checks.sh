#!/usr/bin/env bash
# The GPU checks of one device session, in one short run (docs/results.md "Speed side by side with the
# official code" says what was measured where): the gpu-marked tests and the feature-cache tests, then
# benchmarks/model.py (bf16 + channels_last), the cached evaluation at ResNet-50 / 473, fssmeta vs the
# official code (fp32 official against fssmeta bf16 + channels_last at a larger training batch), and the
# memory bank's exact torch read against FAISS at N = 1e6. From the repository root of the GPU machine:
#
#   bash benchmarks/gpu_checks.sh OUT_DIR
#
# Needs python3 with CUDA torch and the project's imports (on a machine without an index, pip-install their
# wheels first), and checkouts of the official commits tools/oracle.py pins at .official/BAM and
# .official/PFENet. Every step has its own time limit and writes OUT_DIR/<step>.txt; a failed step does not
# stop the others. Prepared for a session with a GPU; not yet run as a whole (planned).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_checks.sh OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run it under a limit, keep its output
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
step tests 150 "$py" -m pytest -q -p no:cacheprovider -o addopts="" tests/unit/test_gpu.py \
  tests/unit/test_feature_cache.py
step model 150 "$py" benchmarks/model.py --sizes resnet50 --steps 10 --batch 8
step eval_cache 150 "$py" benchmarks/eval_cache.py --size resnet50 --images 100 --episodes 1000 --seeds 1 \
  --cache-mib 16384
step compare 180 "$py" benchmarks/compare_official.py --official bam=.official/BAM \
  --official pfenet=.official/PFENet --rows eval1 eval5 train --variants fp32 bf16-cl --repeats 10 \
  --train-batch 2 --fssmeta-train-batch 8
step memory 90 "$py" benchmarks/memory.py --device cuda --sizes 1e6 --channels 512 --batches 64 \
  --kinds torch flat
