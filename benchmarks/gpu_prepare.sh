#!/usr/bin/env bash
# Stage here, before a device session, what benchmarks/gpu_checks.sh needs on a GPU machine that reaches no
# package index: the wheels of the project's imports its image lacks (Python 3.12, versions from
# constraints.txt) in .whl/, and the official files compare_official.py runs in .official/BAM and
# .official/PFENet (only model/, util/ and config/ of tools/oracle.py's pinned commits). Both folders are
# git-ignored; name them in the device call's `carry` (docs/results.md, "GPU checks: how to run them").
#
#   bash benchmarks/gpu_prepare.sh BAM_GIT PFENET_GIT
#
# BAM_GIT / PFENET_GIT: git directories (a clone's .git, or a bare mirror) holding the pinned commits.
# WHEEL_PYTHON (default 3.12, the image's) is the Python the wheels are for.
# The image already holds torch, numpy, pillow, pyyaml, opencv, scipy, tqdm and matplotlib; Ray and MLflow
# are not needed (the checks import neither). faiss-gpu cannot travel: its cu12 build needs CUDA 12's cuBLAS
# (nvidia-cublas-cu12, a 554 MiB wheel) and the image runs CUDA 13, so faiss-cpu goes: the FAISS rows are
# CPU indexes.
set -euo pipefail
bam=${1:?usage: bash benchmarks/gpu_prepare.sh BAM_GIT PFENET_GIT}
pfenet=${2:?usage: bash benchmarks/gpu_prepare.sh BAM_GIT PFENET_GIT}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-.venv/bin/python}  # the project's (tools/oracle.py imports torch)

commit() {  # commit METHOD: the commit tools/oracle.py pins for METHOD
  "$py" -c "from tools.oracle import OFFICIAL; print(OFFICIAL['$1'].commit)"
}

rm -rf .official/BAM .official/PFENet
mkdir -p .official/BAM .official/PFENet
git --git-dir "$bam" archive "$(commit bam)" model util config | tar -x -C .official/BAM
git --git-dir "$pfenet" archive "$(commit pfenet)" model util config | tar -x -C .official/PFENet

names=(pydantic pydantic_core annotated-types typing-inspection albumentations albucore simsimd stringzilla
       pycocotools faiss-cpu)
pins=()
for name in "${names[@]}"; do
  pin=$(grep -i -m1 "^${name}==" constraints.txt) || { echo "constraints.txt pins no $name" >&2; exit 1; }
  pins+=("$pin")
done
rm -rf .whl
mkdir -p .whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${pins[@]}"
ls .whl
du -sh .whl .official
echo "carry: [\".whl\", \".official\"]  (64 MiB a call with the working tree)"
