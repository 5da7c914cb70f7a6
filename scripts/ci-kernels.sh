#!/usr/bin/env bash
# Compiles every kernels/*.cu on its own with the pinned nvcc, to a cubin per target architecture
# with `-Xptxas -v`, and writes the ptxas report (registers, barriers, static shared memory, stack
# frame and spills per kernel and architecture) to $PTXAS_REPORT (default target/ptxas-report.txt)
# and stdout. Fails on a compile error or warning, and on any spill that kernels/spill-allowlist.txt
# does not list with its reason.
#
#   NVCC=... bash scripts/ci-kernels.sh     # NVCC defaults to the one install-cuda-toolchain.sh put in .tools/
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
nvcc="${NVCC:-$(bash scripts/install-cuda-toolchain.sh --print-nvcc)}"
report="${PTXAS_REPORT:-target/ptxas-report.txt}"
allowlist="kernels/spill-allowlist.txt"
archs=(80 90)

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$(dirname "$report")"

# One row per kernel and architecture: file arch kernel registers barriers smem stack spill-stores spill-loads
parse_ptxas() {
  awk -v file="$1" '
    /Compiling entry function/ { split($0, q, "'\''"); kernel = q[2]; arch = q[4]; entry = 1; next }
    /Function properties for/ { props = (entry && index($0, kernel) > 0); next }
    props && /bytes stack frame/ {
      stack = $1; stores = $5; loads = $9; next
    }
    entry && /Used [0-9]+ registers/ {
      regs = 0; bars = 0; smem = 0
      n = split($0, parts, ",")
      for (i = 1; i <= n; i++) {
        if (match(parts[i], /Used [0-9]+ registers/)) { split(substr(parts[i], RSTART), w, " "); regs = w[2] }
        if (match(parts[i], /used [0-9]+ barriers/)) { split(substr(parts[i], RSTART), w, " "); bars = w[2] }
        if (match(parts[i], /[0-9]+ bytes smem/)) { split(substr(parts[i], RSTART), w, " "); smem = w[1] }
      }
      printf "%-16s %-6s %-36s %4d %3d %6d %6d %6d %6d\n", file, arch, kernel, regs, bars, smem, stack, stores, loads
      entry = 0; props = 0; stack = 0; stores = 0; loads = 0
    }
  '
}

rows="$work/rows"
: >"$rows"
status=0
for cu in kernels/*.cu; do
  name="$(basename "$cu")"
  for a in "${archs[@]}"; do
    log="$work/${name%.cu}.sm_$a.log"
    if ! "$nvcc" -cubin -arch="sm_$a" -std=c++17 -O3 -lineinfo -Werror all-warnings -Xptxas -v \
      -I kernels -o "$work/${name%.cu}.sm_$a.cubin" "$cu" >"$log" 2>&1; then
      echo "ERROR: $cu does not compile for sm_$a:" >&2
      cat "$log" >&2
      status=1
      continue
    fi
    parse_ptxas "$name" <"$log" >>"$rows"
  done
done

{
  echo "# ptxas report: $("$nvcc" --version | tail -n 1)"
  printf "%-16s %-6s %-36s %4s %3s %6s %6s %6s %6s\n" file arch kernel regs bar smem stack spillS spillL
  sort -k1,1 -k3,3 -k2,2 "$rows"
} >"$report"
cat "$report"
kernels="$(awk '{print $3}' "$rows" | sort -u | wc -l)"
echo "$kernels kernels, ${#archs[@]} architectures; report in $report"

# Spills: each must be listed as `kernel arch reason...` (arch sm_XX or *), with a reason.
while read -r file arch kernel regs bars smem stack stores loads; do
  if ((stores > 0 || loads > 0)); then
    if awk -v k="$kernel" -v a="$arch" '
        !/^[[:space:]]*(#|$)/ && $1 == k && ($2 == a || $2 == "*") && NF >= 3 { found = 1 }
        END { exit !found }' "$allowlist"; then
      echo "allowed spill: $kernel ($arch) $stores bytes stored, $loads loaded"
    else
      echo "ERROR: $kernel ($arch, $file) spills $stores bytes / loads $loads bytes and is not in $allowlist" >&2
      status=1
    fi
  fi
done <"$rows"

if ((status != 0)); then
  echo "ci-kernels: FAILED" >&2
else
  echo "ci-kernels: ok"
fi
exit "$status"
