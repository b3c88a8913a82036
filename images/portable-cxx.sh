#!/bin/sh
# The C++ compiler for DeepSpeed's CPU ops (CPU Adam for ZeRO-Offload) when they are built
# into an image. DeepSpeed compiles them for the machine that builds: `-march=native` and the
# widest SIMD path that machine has (`-D__AVX512__`). An image built on an AVX-512 host then
# dies with SIGILL on a node without AVX-512 (deepspeedai/DeepSpeed#1886: an image built on
# Intel, run on AMD A100 nodes). This wrapper compiles them for CPU_OPS_MARCH instead
# (x86-64-v3: AVX2 and FMA, every x86 GPU server since Haswell and Zen 1) with the SIMD path
# that level has (CPU_OPS_SIMD, DeepSpeed's own define for it); everything else goes to the
# real compiler (CPU_OPS_CXX, default c++) unchanged. Used as CXX for torch's ninja builds.
: "${CPU_OPS_MARCH:=x86-64-v3}" "${CPU_OPS_SIMD:=__AVX256__}" "${CPU_OPS_CXX:=c++}"
for arg do
    shift
    case "$arg" in
        -march=native) arg="-march=$CPU_OPS_MARCH" ;;
        -D__AVX512__) arg="-D$CPU_OPS_SIMD" ;;
    esac
    set -- "$@" "$arg"
done
exec "$CPU_OPS_CXX" "$@"
