#!/usr/bin/env bash
# The one call a session makes on a lent GPU machine (../shared/gpu/README.md). Here, first:
#   make gpu-kit            (the wheels the machine lacks, in .gpu-kit/, under the carry limit)
# then the device's run, carrying [".gpu-kit"], with a timeout_s of 600:
#   bash tests/gpu/device_call.sh
# It prints the versions there (and leaves pip's list), stops with exit 3 where the libraries
# do not import, runs the GPU suite (a stage may take KUBERLHF_STAGE_TIMEOUT_S,
# the suite SUITE_S; GPU_TESTS: a -k expression) and a short benchmark (BENCH_CASES,
# BENCH_IMPLS, BENCH_S), and leaves under $OUT: versions.txt, gpu.log, bench.log, gpu.json
# and torch_ext.tgz (DeepSpeed's fused-Adam build: put it at .gpu-kit/torch_ext.tgz and the
# next machine skips the 53 s build).
set -uo pipefail
out=${OUT:?run this on the device machine, where OUT is set}
# shellcheck source=/dev/null
source .gpu-kit/device-env.sh || exit 1
python3 - <<'PY' 2>&1 | tee "$out/versions.txt"
import importlib

for name in ("torch", "transformers", "deepspeed", "peft", "trl", "datasets", "pydantic",
             "tensorboard", "faiss", "pandas"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:  # noqa: BLE001 - a missing wheel is what this line is for
        print(name, "MISSING:", type(exc).__name__, exc)
import torch.utils.tensorboard  # noqa: E402,F401 - every stage opens a TensorBoard sink
PY
python3 -m pip list --format=freeze > "$out/pip-list.txt" 2>&1
# a library that does not import (transformers checks its dependencies' versions on import)
# would fail every test and the benchmark: stop here, with the reason, not after the budget
python3 -c "import transformers, trl, peft, deepspeed, jobs.stages" || exit 3
export KUBERLHF_STAGE_TIMEOUT_S=${KUBERLHF_STAGE_TIMEOUT_S:-240}
# as `make test-gpu` runs it (GPU_WORKERS workers on the one GPU, a module each), each test's
# outcome on its own line as it ends, so that a suite stopped by SUITE_S still tells what it
# reached
xdist=$(python3 -c 'import xdist' 2>/dev/null && echo "-n ${GPU_WORKERS:-4} --dist loadfile")
# shellcheck disable=SC2086
timeout -k 10 "${SUITE_S:-360}" python3 -m pytest -v -rs --durations=0 -p no:cacheprovider \
  -m gpu tests/gpu $xdist ${GPU_TESTS:+-k "$GPU_TESTS"} 2>&1 | tee "$out/gpu.log"
suite=${PIPESTATUS[0]}
echo "the GPU suite's exit status: $suite" | tee -a "$out/gpu.log"
timeout -k 10 "${BENCH_S:-180}" python3 -m bench.gpu --only "${BENCH_CASES:-sft}" --seq 1024 \
  --steps 15 --impls "${BENCH_IMPLS:-ours,plain,trl}" --timeout 150 2>&1 | tee "$out/bench.log"
cp bench/results/gpu.json "$out/" 2>/dev/null || echo "no bench/results/gpu.json"
if [ -d "$TORCH_EXTENSIONS_DIR" ]; then
  tar -czf "$out/torch_ext.tgz" -C "$TORCH_EXTENSIONS_DIR" .
fi
exit "$suite"
