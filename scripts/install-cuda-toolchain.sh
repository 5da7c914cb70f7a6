#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, ptxas, cicc, headers) from NVIDIA's PyPI wheels into
# .tools/cuda-13.0 (git-ignored), no root and no GPU needed, and checks that it compiles a kernel.
#
#   bash scripts/install-cuda-toolchain.sh               # install (once) and print the export line
#   bash scripts/install-cuda-toolchain.sh --print-nvcc  # print the nvcc path (fails if not installed)
#
# Every wheel is pinned: with nvidia-cuda-nvcc alone pip pulls newer crt/nvvm/runtime wheels that do
# not match it, and without nvidia-cuda-cccl <nv/target> is missing (cuda_fp16.h does not compile).
# nvcc needs no environment variables in this layout: bin/nvcc.profile points it at ../nvvm (cicc,
# libdevice), ../include, bin/crt and ptxas next to it.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
prefix="$root/.tools/cuda-13.0"
nvcc="$prefix/nvidia/cu13/bin/nvcc"
wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
stamp="$prefix/.installed"

if [[ "${1:-}" == "--print-nvcc" ]]; then
  if [[ ! -f "$stamp" || ! -x "$nvcc" ]]; then
    echo "the CUDA toolchain is not installed; run: bash scripts/install-cuda-toolchain.sh" >&2
    exit 1
  fi
  echo "$nvcc"
  exit 0
fi

if [[ -f "$stamp" && "$(cat "$stamp")" == "${wheels[*]}" && -x "$nvcc" ]]; then
  echo "CUDA toolchain already installed: ${wheels[*]}"
else
  python3 -m pip --version >/dev/null 2>&1 || { echo "python3 -m pip is needed to install nvcc" >&2; exit 1; }
  rm -rf "$prefix.partial"
  echo "installing ${wheels[*]} into $prefix"
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$prefix.partial" "${wheels[@]}"
  rm -rf "$prefix"
  mv "$prefix.partial" "$prefix"
  echo "${wheels[*]}" >"$stamp"
fi

# A kernel that needs the headers of every wheel (cuda_fp16.h pulls <nv/target> from cccl).
probe="$(mktemp -d)"
trap 'rm -rf "$probe"' EXIT
cat >"$probe/probe.cu" <<'EOF'
#include <cuda_fp16.h>
extern "C" __global__ void probe(float* y, const __half* x) { y[threadIdx.x] = __half2float(x[threadIdx.x]); }
EOF
"$nvcc" -cubin -arch=sm_90 -o "$probe/probe.cubin" "$probe/probe.cu"
"$nvcc" --version | tail -n 2
echo "export NVCC=$nvcc"
