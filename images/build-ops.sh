#!/bin/sh
# Builds DeepSpeed's fused Adam and CPU Adam into the image (images/Dockerfile runs it), where
# a CUDA compiler is: nvcc on the PATH (a -devel base) or in CUDA_TOOLKIT (a toolkit mounted
# into the build; the headers of cuBLAS and the other libraries then come from the CUDA wheels
# torch brought). Elsewhere the ops compile where they first run, as DeepSpeed does by default.
#
# A build sees no GPU, so DeepSpeed is told the target (DS_ACCELERATOR=cuda): it would build
# its CPU variants, which a GPU node ignores and compiles again (deepspeedai/DeepSpeed#7011;
# DeepSpeed's own nv-pre-compile-ops workflow sets it). On x86, CPU Adam is compiled for
# CPU_OPS_MARCH through images/portable-cxx.sh (which says why), and the build fails if AVX-512
# code is in it all the same (torch falling back from ninja to a compiler the wrapper does not
# see would do that).
set -eu
here=$(dirname "$0")
# A prebuilt op holds code for the listed GPUs only, and DeepSpeed loads it without checking
# the GPU (only its JIT path adds PTX): without PTX for the newest listed arch, a newer GPU
# (Blackwell, sm_100) fails at the first fused Adam step with "no kernel image is available".
case "${TORCH_CUDA_ARCH_LIST:-}" in
    *+PTX*) ;;
    "") ;;
    *)
        echo "build-ops: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST has no +PTX; add it to the" \
            "newest arch (8.0;9.0+PTX) so GPUs newer than the list can run the ops" >&2
        exit 1
        ;;
esac
if [ -n "${CUDA_TOOLKIT:-}" ]; then
    if [ ! -x "$CUDA_TOOLKIT/bin/nvcc" ]; then
        echo "build-ops: CUDA_TOOLKIT=$CUDA_TOOLKIT has no bin/nvcc" >&2
        exit 1
    fi
    includes=$(python -c 'import glob, sysconfig
print(":".join(glob.glob(sysconfig.get_paths()["purelib"] + "/nvidia/*/include")))')
    export CUDA_HOME="$CUDA_TOOLKIT" PATH="$CUDA_TOOLKIT/bin:$PATH" CPATH="$includes"
fi
if ! command -v nvcc >/dev/null 2>&1; then
    echo "build-ops: no nvcc here, DeepSpeed's ops will compile where they first run"
    exit 0
fi
portable=""
if [ "$(uname -m)" = x86_64 ] && [ -n "${CPU_OPS_MARCH:-}" ]; then
    portable=1
    export CXX="$here/portable-cxx.sh"
fi
DS_ACCELERATOR=cuda DS_ENABLE_NINJA=1 DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 \
    python -m pip install --no-build-isolation --no-deps --force-reinstall --no-binary deepspeed \
    "$(grep -i '^deepspeed==' "$here/requirements.txt")"
DS_ACCELERATOR=cuda python -c "from deepspeed.git_version_info import installed_ops as ops, \
accelerator_name as built_for
assert built_for == 'cuda' and ops['fused_adam'] and ops['cpu_adam'], (built_for, ops)"
if [ -n "$portable" ]; then
    library=$(python -c "import importlib.util as u
print(u.find_spec('deepspeed.ops.adam.cpu_adam_op').origin)")
    # AVX-512's registers: zmm, the mask registers k1-k7, xmm/ymm 16-31 (images/localbuild.py)
    if objdump -d "$library" | grep -qE '%zmm|%k[1-7]|%[xy]mm(1[6-9]|2[0-9]|3[01])'; then
        echo "build-ops: CPU Adam holds AVX-512 code ($library)" >&2
        exit 1
    fi
fi
