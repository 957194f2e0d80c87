#!/usr/bin/env bash
# The GPU checks in one run, for a lent CUDA machine (its own python3 and torch; no network
# there). What it runs, each under its own time limit (at most 10 minutes in all):
#   1. tools/trainer_check.py: real `blt-dist train` processes on NCCL: bf16 on ZeRO-0, 1 and 3
#      for the tiny BLT and BPE, an injected NaN step, a SIGKILL and a bit-exact resume, the
#      export and an eval, the first steps' losses against the CPU, and the trainer's MFU at
#      125M (CPU twin: tests/test_trainer_check.py runs its --quick subset in CI);
#   2. the gpu-marked tests: flex and flash attention against the dense reference, forward and
#      backward, the loader's layout facts under flash, and the entropy pass on CUDA against CPU;
#   3. `blt-dist bench --suite gpu`: MFU of a bf16 training step of the 1B BLT and BPE configs at
#      8192 bytes, in each attention mode (auto, flash, flex).
#
# Here, once:  bash tools/gpu_check.sh --prepare   fetches wheels (Python 3.12, x86-64) of what
#              the device image lacks into .whl/, and builds DeepSpeed's (an sdist on PyPI) here
# There:       bash tools/gpu_check.sh [OUT]         with .whl carried along; OUT defaults to $OUT,
#              else /tmp/gpu-check; device.txt, trainer/, gpu-tests.log, bench.md and bench.json
#              land there.
set -uo pipefail
cd "$(dirname "$0")/.."

# Versions as in this project's CPU environment (zstd: 1.5.7.3 is yanked, any zstd will do).
WHEELS=(omegaconf==2.4.0 mosaicml-streaming==0.13.0 catalogue==2.0.10 brotli==1.2.1 cramjam==2.14.0
        python-snappy==0.7.3 zstd==1.5.6.2 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2
        opentelemetry-semantic-conventions==0.66b2
        hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 submitit==1.5.4)
# DeepSpeed's own dependencies not listed above (einops, msgpack, ninja, psutil, py-cpuinfo) are in
# the device image (../.library/device/KINDS.md).

if [[ "${1:-}" == "--prepare" ]]; then
    rm -rf .whl && mkdir -p .whl
    platforms=()
    for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1 manylinux_2_5; do
        platforms+=(--platform "${p}_x86_64")
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "${WHEELS[@]}" || exit 1
    # DeepSpeed ships only an sdist; without its C++ ops (JIT-built where used) the wheel is pure Python
    py=python3; [[ -x .venv/bin/python ]] && py=.venv/bin/python  # the build imports torch
    DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl || exit 1
    echo "prepared .whl ($(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1)); carry it to the device machine"
    exit 0
fi

out=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$out"
if [[ -d .whl ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
python3 - <<'PY' 2>&1 | tee "$out/device.txt" || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device visible"
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
PY
status=0
timeout 270 python3 tools/trainer_check.py "$out/trainer" --device cuda 2>&1 | tee "$out/trainer.log" || status=1
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_attention_equivalence.py tests/test_entropies.py \
    2>&1 | tee "$out/gpu-tests.log" || status=1
timeout 180 python3 -m blt_dist.cli bench --suite gpu --json "$out/bench.json" 2>&1 | tee "$out/bench.md" || status=1
exit $status
