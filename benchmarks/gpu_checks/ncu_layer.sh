#!/usr/bin/env bash
# Issue 11: what each NSA kernel waits on, from the hardware counters (Nsight Compute). One warm pass of
# the paper config's branches, forward and backward (benchmarks/gpu_checks/ncu_layer.py), profiled
# kernel by kernel; then a table a kernel: duration, compute and memory throughput as a share of peak,
# achieved occupancy, registers, L2 and DRAM bytes, and its warps' three largest stall reasons. ncu
# replays each kernel once per counter pass, so the durations are ncu's, not do_bench's. One device call
# of about 2-4 minutes, carry [".whl"]:
#   COMMIT=$(git rev-parse --short HEAD) SEQ=8192 bash benchmarks/gpu_checks/ncu_layer.sh
# Writes $OUT/ncu-layer-$SEQ-$COMMIT.ncu.log (ncu's raw page as CSV: with --log-file ncu writes its report
# there, not to stdout), .out (the program's own output) and .txt (the table). The table alone, from a log
# that came back: NCU_TABLE_ONLY=1 OUT=<folder> ... bash benchmarks/gpu_checks/ncu_layer.sh
set -u
tag=${COMMIT:-unknown}
seq=${SEQ:-8192}
base=$OUT/ncu-layer-$seq-$tag
if [ "${NCU_TABLE_ONLY:-0}" != 1 ]; then
  source benchmarks/proof/setup.sh
  # --clock-control none: leave the clocks as they are (the device tool's METHOD.md)
  timeout ${NCU_LIMIT:-420} ncu --clock-control none --profile-from-start off --kernel-name-base function \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis \
    --metrics lts__t_bytes.sum,dram__bytes.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active \
    --csv --page raw --print-units base --log-file $base.ncu.log \
    $PYTHON benchmarks/gpu_checks/ncu_layer.py --seq $seq > $base.out 2>&1
  echo "ncu rc=$? ($(grep -c '^"' $base.ncu.log) csv lines)"
  tail -3 $base.out
fi
PYTHON=${PYTHON:-python3}
$PYTHON - "$base" <<'PY' | tee $base.txt
import csv, sys
base = sys.argv[1]
lines = [l for l in open(base + ".ncu.log") if l.startswith('"')]
rows = list(csv.DictReader(lines))
rows = [r for r in rows if r.get("ID", "").isdigit()]  # the second line holds the units
def num(r, key):
    try:
        return float(str(r.get(key, "")).replace(",", ""))
    except ValueError:
        return float("nan")
stall_keys = [k for k in (rows[0] if rows else {})
              if k.startswith("smsp__average_warps_issue_stalled_") and k.endswith("_per_issue_active.ratio")]
print(f"{'kernel':<44} {'us':>8} {'SM%':>5} {'mem%':>5} {'tc%':>5} {'occ%':>5} {'regs':>4} "
      f"{'L2 MB':>7} {'DRAM MB':>7}  top stalls (warp-cycles per issue)")
for r in rows:
    name = r.get("Kernel Name", "?")[:44]
    stalls = sorted(((num(r, k), k[len("smsp__average_warps_issue_stalled_"):-len("_per_issue_active.ratio")])
                     for k in stall_keys), reverse=True)[:3]
    print(f"{name:<44} {num(r, 'gpu__time_duration.sum') / 1e3:8.1f} "
          f"{num(r, 'sm__throughput.avg.pct_of_peak_sustained_elapsed'):5.1f} "
          f"{num(r, 'gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed'):5.1f} "
          f"{num(r, 'sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active'):5.1f} "
          f"{num(r, 'sm__warps_active.avg.pct_of_peak_sustained_active'):5.1f} "
          f"{num(r, 'launch__registers_per_thread'):4.0f} "
          f"{num(r, 'lts__t_bytes.sum') / 1e6:7.1f} {num(r, 'dram__bytes.sum') / 1e6:7.1f}  "
          + ", ".join(f"{k} {v:.1f}" for v, k in stalls))
PY
