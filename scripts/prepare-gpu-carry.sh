#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a lent GPU machine (CUDA driver, nvcc, PyTorch, but no
# Rust) into gpu-carry/ (git-ignored): the kernel test executables and the release unet3d binary,
# all with the kernels embedded by the pinned nvcc. Carry the folder with the working tree (the
# device tool's `carry: ["gpu-carry"]`); tree and carry together must stay under 64 MiB.
#
#   bash scripts/prepare-gpu-carry.sh
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/install-cuda-toolchain.sh >/dev/null
NVCC="$(bash scripts/install-cuda-toolchain.sh --print-nvcc)"
export NVCC
# A target folder of its own: building with NVCC set would otherwise rebuild target/ for everyone.
target="$root/target/gpu-carry"
carry="$root/gpu-carry"
limit=$((54 * 1024 * 1024)) # 64 MiB minus room for the working tree (about 10 MiB)

cargo build --release --locked --target-dir "$target" --bin unet3d
tests_json="$(mktemp)"
trap 'rm -f "$tests_json"' EXIT
cargo test --release --locked --target-dir "$target" --no-run --message-format=json \
  --lib --test sim_runtime --test sim_kernels --test sim_conv --test sim_fused --test sim_network >"$tests_json"

rm -rf "$carry"
mkdir -p "$carry"
cp "$target/release/unet3d" "$carry/unet3d"
# One executable per test target: lib (the unit tests), sim_runtime, sim_kernels, sim_conv, sim_fused, sim_network.
jq -r 'select(.reason == "compiler-artifact" and .executable != null and .profile.test == true)
       | "\(.target.kind[0]) \(.target.name) \(.executable)"' "$tests_json" |
  while read -r kind name exe; do
    if [[ "$kind" == "lib" ]]; then name="lib_tests"; fi
    cp "$exe" "$carry/$name"
  done
for f in "$carry"/*; do
  strip --strip-debug "$f"
done
for f in unet3d lib_tests sim_runtime sim_kernels sim_conv sim_fused sim_network; do
  [[ -x "$carry/$f" ]] || { echo "prepare-gpu-carry: $f was not built" >&2; exit 1; }
done

{
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(ldd --version | head -n 1)"
  echo "nvcc: $("$NVCC" --version | tail -n 1)"
} >"$carry/BUILD-INFO"

# Seven executables that each embed the kernels come to ~100 MiB; xz packs them to ~25 MiB, which
# gpu-check.sh unpacks on the GPU machine.
bins=(unet3d lib_tests sim_runtime sim_kernels sim_conv sim_fused sim_network)
tar -C "$carry" -cf - "${bins[@]}" | xz -T0 -6 >"$carry/bins.tar.xz"
for f in "${bins[@]}"; do rm "$carry/$f"; done

size="$(du -sb "$carry" | cut -f1)"
ls -l "$carry"
echo "gpu-carry: $((size / 1024 / 1024)) MiB"
if ((size > limit)); then
  echo "prepare-gpu-carry: $size bytes exceeds the $limit bytes left for it under the 64 MiB carry limit" >&2
  exit 1
fi
