"""One table from Nsight Compute's raw CSV (`ncu --import R --page raw --csv`): per kernel launch its time,
throughputs, occupancy and its four largest warp-stall reasons (cycles a warp spends stalled on each
reason, per instruction issued).

    python3 benchmarks/gpu_checks/ncu_summary.py ncu-128k-<commit>.csv[.gz]
"""

import csv
import gzip
import sys

STALL = ("smsp__average_warps_issue_stalled_", "_per_issue_active.ratio")
COLUMNS = [  # (header, metric)
    ("time", "gpu__time_duration.sum"),  # in the unit the CSV's second row gives (ms for these kernels)
    ("SM %", "sm__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("mem %", "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed"),
    ("dram %", "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"),
    ("L2 hit", "lts__t_sector_hit_rate.pct"),
    ("L1 hit", "l1tex__t_sector_hit_rate.pct"),
    ("tensor %", "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"),
    ("occ %", "sm__warps_active.avg.pct_of_peak_sustained_active"),
    ("regs", "launch__registers_per_thread"),
    ("threads", "launch__block_size"),
    ("spills", "derived__local_spilling_requests"),
    ("cyc/inst", "smsp__average_warp_latency_per_inst_issued.ratio"),
]


def number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def main(path: str) -> None:
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    header_at = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
    if header_at is None:
        print(f"{path}: no 'Kernel Name' column; the first lines are:\n" + "\n".join(",".join(r) for r in rows[:5]))
        return
    names = rows[header_at]
    units = dict(zip(names, rows[header_at + 1]))  # the row after the header holds units
    data = [dict(zip(names, r)) for r in rows[header_at + 2:]]
    stalls = [m for m in names if m.startswith(STALL[0]) and m.endswith(STALL[1]) and "not_issued" not in m]
    print(f"{path}: {len(data)} kernel launches; time in {units.get(COLUMNS[0][1], '?')}")
    print(" | ".join(["kernel"] + [h for h, _ in COLUMNS] + ["largest stalls (cycles / instruction)"]))
    for r in data:
        cells = [r["Kernel Name"][:34]]
        for _, metric in COLUMNS:
            value = number(r.get(metric, ""))
            cells.append("-" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.2f}")
        ranked = sorted(((number(r[m]) or 0.0, m[len(STALL[0]):-len(STALL[1])]) for m in stalls), reverse=True)
        cells.append(", ".join(f"{reason} {value:.1f}" for value, reason in ranked[:4]))
        print(" | ".join(cells))


if __name__ == "__main__":
    main(sys.argv[1])
