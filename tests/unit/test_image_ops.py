"""DeepSpeed's CPU ops built into an image run on every x86 GPU node, not only on CPUs like
the build machine's: images/portable-cxx.sh, the compiler the Dockerfile gives their build,
compiles DeepSpeed's own SIMD code for x86-64-v3 (AVX2) where DeepSpeed asks for the build
machine's CPU (`-march=native -D__AVX512__`). `make images-cuda-local` checks the real CPU
Adam of a built image the same way (images/localbuild.py)."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from images.localbuild import AVX512_CODE
from tests.conftest import ROOT

WRAPPER = ROOT / "images" / "portable-cxx.sh"
# An AXPY over DeepSpeed's SIMD macros (what CPU Adam's inner loop is made of), its tail in
# scalar code; prints the sum so a wrong build shows in the result as well as in the code.
SOURCE = r"""
#include <cstdio>
#include <cstring>
#include <type_traits>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include "simd.h"
int main() {
    static float x[1003], y[1003];
    for (int i = 0; i < 1003; ++i) { x[i] = i * 0.5f; y[i] = 1.0f; }
    int i = 0;
#if defined(SIMD_WIDTH)
    AVX_Data a; a.data = SIMD_SET(2.0f);
    for (; i + SIMD_WIDTH <= 1003; i += SIMD_WIDTH) {
        AVX_Data xs, ys; xs.data = SIMD_LOAD(x + i); ys.data = SIMD_LOAD(y + i);
        SIMD_STORE(y + i, SIMD_FMA(a.data, xs.data, ys.data));
    }
#endif
    for (; i < 1003; ++i) y[i] += 2.0f * x[i];
    double sum = 0; for (int j = 0; j < 1003; ++j) sum += y[j];
    std::printf("%.1f\n", sum);
}
"""
EXPECTED = sum(1.0 + 2.0 * (i * 0.5) for i in range(1003))


def deepspeed_cpu_flags() -> list[str]:
    """The flags DeepSpeed compiles CPU Adam with on this machine."""
    from deepspeed.ops.op_builder.cpu import CPUAdamBuilder

    return CPUAdamBuilder().cxx_args()


def build_and_run(compiler: list[str], tmp_path: Path, name: str) -> tuple[int, float]:
    """AVX-512 instructions in the program built with DeepSpeed's flags, and what it prints."""
    import deepspeed
    import torch.utils.cpp_extension

    includes = [Path(deepspeed.__file__).parent / "ops" / "csrc" / "includes"]
    includes += torch.utils.cpp_extension.include_paths()  # simd.h uses c10's half types
    source, program = tmp_path / "axpy.cpp", tmp_path / name
    source.write_text(SOURCE)
    subprocess.run(
        [*compiler, *deepspeed_cpu_flags(), *(f"-I{i}" for i in includes), str(source)]
        + ["-o", str(program)],
        check=True,
        capture_output=True,
    )
    code = subprocess.run(["objdump", "-d", str(program)], capture_output=True, text=True).stdout
    printed = subprocess.run([str(program)], capture_output=True, text=True, check=True).stdout
    return sum(bool(AVX512_CODE.search(line)) for line in code.splitlines()), float(printed)


@pytest.mark.skipif(
    platform.machine() != "x86_64" or not (shutil.which("c++") and shutil.which("objdump")),
    reason="needs an x86-64 machine with a C++ compiler and objdump",
)
def test_cpu_ops_are_compiled_for_every_x86_gpu_node_not_the_build_machine(tmp_path):
    if "-D__AVX512__" not in deepspeed_cpu_flags():
        pytest.skip("this CPU has no AVX-512: DeepSpeed's flags already suit every node")
    # as DeepSpeed builds it: AVX-512 code, which AVX2-only nodes (AMD Milan, ...) cannot run
    native, native_sum = build_and_run(["c++"], tmp_path, "native")
    assert native > 0 and native_sum == EXPECTED
    portable, portable_sum = build_and_run([str(WRAPPER)], tmp_path, "portable")
    assert portable == 0, f"{portable} AVX-512 instructions in the image's build"
    assert portable_sum == EXPECTED


def test_the_wrapper_rewrites_only_the_machine_and_simd_flags(tmp_path):
    """On any machine: what reaches the real compiler, argument by argument."""
    recorder = tmp_path / "recorder"
    recorder.write_text('#!/bin/sh\nfor arg do printf "%s\\n" "$arg"; done > "$RECORD"\n')
    recorder.chmod(0o755)
    record = tmp_path / "args"
    given = ["-O3", "-march=native", "-fopenmp", "-D__AVX512__", "-DNAME=a b", "-Ifoo bar", "x.cpp"]
    environment = {"PATH": "/usr/bin:/bin", "CPU_OPS_CXX": str(recorder), "RECORD": str(record)}
    subprocess.run([str(WRAPPER), *given], env=environment, check=True)
    assert record.read_text().splitlines() == [
        "-O3", "-march=x86-64-v3", "-fopenmp", "-D__AVX256__", "-DNAME=a b", "-Ifoo bar", "x.cpp"
    ]  # fmt: skip
    subprocess.run(
        [str(WRAPPER), *given],
        env={**environment, "CPU_OPS_MARCH": "znver3", "CPU_OPS_SIMD": "__SCALAR__"},
        check=True,
    )
    assert record.read_text().splitlines()[1:4] == ["-march=znver3", "-fopenmp", "-D__SCALAR__"]


@pytest.mark.parametrize("arch, refused", [("8.0;9.0", True), ("8.0;9.0+PTX", False)])
def test_the_prebuilt_ops_keep_ptx_for_gpus_newer_than_the_list(arch, refused, tmp_path):
    """DeepSpeed adds PTX only when it compiles at run time: ops built for 8.0 and 9.0
    alone fail on a Blackwell GPU. build-ops.sh refuses such a list before it builds
    (here, without nvcc, the accepted list ends where a machine without it ends)."""
    build_ops = ROOT / "images" / "build-ops.sh"
    # a PATH with dirname alone: no nvcc (which would build DeepSpeed into this machine)
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "dirname").symlink_to(shutil.which("dirname"))
    result = subprocess.run(
        ["/bin/sh", str(build_ops)],
        env={"PATH": str(tools), "TORCH_CUDA_ARCH_LIST": arch},
        capture_output=True,
        text=True,
    )
    assert (result.returncode != 0) == refused, result.stderr
    if refused:
        assert "has no +PTX" in result.stderr
    else:
        assert "no nvcc here" in result.stdout
    default = re.search(
        r'ARG TORCH_CUDA_ARCH_LIST="([^"]*)"', build_ops.with_name("Dockerfile").read_text()
    )
    assert default and "+PTX" in default[1]  # the image's own default passes
