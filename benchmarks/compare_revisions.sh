#!/usr/bin/env bash
# One device call for a change that must not change the kernels' speed or results: the GPU
# correctness checks on this tree, then the GEMM and attention quick benchmarks on a base tree and
# on this tree, alternating (base, new, base, new) so both are measured in the same run.
#   benchmarks/compare_revisions.sh BASE_TREE        (OUT: the device tool's output folder)
set -u
base=$(cd "$1" && pwd)
new=$(pwd)
export PYTHONUNBUFFERED=1
log=$OUT/log.txt
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  PYTHONPATH=$new timeout 150 python3 benchmarks/check_gemm.py; echo "check_gemm rc=$?"
  PYTHONPATH=$new timeout 150 python3 benchmarks/check_attention.py; echo "check_attention rc=$?"
  for round in 1 2; do
    [ $round = 2 ] && [ $SECONDS -gt 330 ] && { echo "round 2 skipped (time)"; break; }
    for tree in base new; do
      dir=$OUT/$tree$round; mkdir -p "$dir"
      src=$([ $tree = base ] && echo "$base" || echo "$new")
      (cd "$src" && PYTHONPATH=$src OUT=$dir timeout 150 python3 benchmarks/gemm.py --quick; echo "$tree$round gemm rc=$?")
      (cd "$src" && PYTHONPATH=$src timeout 150 python3 benchmarks/attention.py --quick --out-dir "$dir"; echo "$tree$round attention rc=$?")
      rm -f "$dir"/*.md
    done
  done
} > "$log" 2>&1
for round in 1 2; do
  [ -d "$OUT/new$round" ] || continue
  echo "# round $round"; python3 benchmarks/compare_timings.py "$OUT/base$round" "$OUT/new$round"
done | tee "$OUT/summary.md"
(cd "$OUT" && tar czf runs.tgz base* new* && rm -r base? new?)
grep -E "rc=|FAIL|worst" "$log" | tail -20
