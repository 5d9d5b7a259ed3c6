#!/usr/bin/env bash
# The GPU checks of one device session, in one short run (docs/results.md "Speed side by side with the
# official code" says what was measured where): the gpu-marked tests and the feature-cache tests, then
# benchmarks/model.py (bf16 + channels_last), the cached evaluation at ResNet-50 / 473, fssmeta vs the
# official code (fp32 official against fssmeta bf16 + channels_last at a larger training batch), and the
# memory bank's exact torch read against FAISS at N = 1e6. From the repository root of the GPU machine:
#
#   bash benchmarks/gpu_checks.sh OUT_DIR
#
# Needs python3 with CUDA torch. The project's other imports come from .whl/ (or $WHEELS) when it holds
# wheels (staged by benchmarks/gpu_prepare.sh; installed first into $SITE, default /tmp/fssmeta-site), the
# official files from .official/BAM and .official/PFENet (the same script); without them the comparison
# step is skipped and says so. Every step has its own time limit and writes OUT_DIR/<step>.txt; a failed
# step does not stop the others.
# OUT_DIR/summary.txt lists each step's outcome, and the script exits 1 when any step failed.
#
# SMOKE=1 runs every step at toy sizes on whatever device there is, in about a minute on a 2-core CPU:
# tests/integration/test_gpu_checks.py runs it so the steps' flags stay those the scripts take. Not yet run
# as a whole on a GPU (planned: the next session lent one).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_checks.sh OUT_DIR}
mkdir -p "$out"
: > "$out/summary.txt"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failed=0

wheels=${WHEELS:-.whl}
if compgen -G "$wheels/*.whl" > /dev/null; then
  site=${SITE:-/tmp/fssmeta-site}
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl \
    || { echo "installing $wheels/ into $site failed" | tee -a "$out/summary.txt"; exit 1; }
  export PYTHONPATH="$PYTHONPATH:$site"
fi

if [ "${SMOKE:-0}" = 1 ]; then
  tests=(tests/unit/test_gpu.py)
  model=(--sizes small --steps 1 --batch 1 --methods bam)
  cache=(--size small --images 4 --classes 2 --episodes 4 --seeds 1 --cache-mib 64)
  compare=(--size 65 --rows eval1 train --variants fp32 --repeats 1 --train-batch 2 --fssmeta-train-batch 4)
  memory=(--device cpu --sizes 1e3 --channels 16 --batches 2 --repeats 2)
else
  tests=(tests/unit/test_gpu.py tests/unit/test_feature_cache.py)
  model=(--sizes resnet50 --steps 10 --batch 8)
  cache=(--size resnet50 --images 100 --episodes 1000 --seeds 1 --cache-mib 16384)
  compare=(--rows eval1 eval5 train --variants fp32 bf16-cl --repeats 10 --train-batch 2 --fssmeta-train-batch 8)
  memory=(--device cuda --sizes 1e6 --channels 512 --batches 64)
fi

step() {  # step NAME SECONDS COMMAND...: run it under a limit, keep its output, note its outcome
  local name=$1 limit=$2 rc
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then
    echo "$name: ok" >> "$out/summary.txt"
  else
    echo "$name: failed (exit $rc$([ "$rc" = 124 ] && echo ", past its ${limit} s"))" >> "$out/summary.txt"
    failed=1
  fi
}

if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
fi
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$out/gpu.txt"
step tests 150 "$py" -m pytest -q -p no:cacheprovider -o addopts="" "${tests[@]}"
step model 150 "$py" benchmarks/model.py "${model[@]}"
step eval_cache 150 "$py" benchmarks/eval_cache.py "${cache[@]}"
if [ -f .official/BAM/model/BAM.py ] && [ -f .official/PFENet/model/PFENet.py ]; then
  step compare 180 "$py" benchmarks/compare_official.py --official bam=.official/BAM \
    --official pfenet=.official/PFENet "${compare[@]}"
else
  echo "compare: skipped (no .official/BAM or .official/PFENet: benchmarks/gpu_prepare.sh stages them)" \
    | tee -a "$out/summary.txt"
fi
step memory 90 "$py" benchmarks/memory.py "${memory[@]}" --kinds torch flat
echo "== summary"
cat "$out/summary.txt"
exit "$failed"
