"""Compare two runs of the GEMM and attention benchmarks (JSON from ``gemm.py`` / ``attention.py``):
per cell, ours-new / ours-base; peers (bf16, SDPA, ...) as a control for machine drift.

    python benchmarks/compare_timings.py BASE_DIR NEW_DIR     # each holding gemm_bench.json, attention_bench.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

GEMM_OURS = ("ours_w4a16_graph", "ours_w8a16_graph", "ours_fp8_graph")
GEMM_PEERS = ("bf16_graph", "tinygemm_w4_graph", "scaled_mm_fp8_graph")


def _gemm(base: dict, new: dict) -> list[str]:
    lines = ["| N | K | M | " + " | ".join(f"{c} new/base" for c in GEMM_OURS + GEMM_PEERS) + " |",
             "|---:|---:|---:|" + "---:|" * (len(GEMM_OURS) + len(GEMM_PEERS))]
    ratios: dict[str, list[float]] = {c: [] for c in GEMM_OURS + GEMM_PEERS}
    for b, n in zip(base["rows"], new["rows"]):
        assert (b["N"], b["K"], b["M"]) == (n["N"], n["K"], n["M"]), "the runs measured different shapes"
        cells = []
        for c in GEMM_OURS + GEMM_PEERS:
            r = n[c] / b[c] if b.get(c) and n.get(c) else float("nan")
            ratios[c].append(r)
            cells.append(f"{r:.3f}")
        lines.append(f"| {b['N']} | {b['K']} | {b['M']} | " + " | ".join(cells) + " |")
    lines.append("| median | | | " + " | ".join(f"{statistics.median(v):.3f}" for v in ratios.values()) + " |")
    return lines


def _attention(base: dict, new: dict) -> list[str]:
    formats = [k for k, v in base["rows"][0].items() if isinstance(v, dict)]
    lines = ["| batch | context | " + " | ".join(f"{f} new/base" for f in formats) + " | SDPA new/base |",
             "|---:|---:|" + "---:|" * (len(formats) + 1)]
    ratios: dict[str, list[float]] = {f: [] for f in [*formats, "sdpa"]}
    for b, n in zip(base["rows"], new["rows"]):
        cells = []
        for f in formats:
            r = n[f]["us"] / b[f]["us"]
            ratios[f].append(r)
            cells.append(f"{r:.3f}")
        s = n["sdpa_bf16_us"] / b["sdpa_bf16_us"]
        ratios["sdpa"].append(s)
        lines.append(f"| {b['batch']} | {b['context']} | " + " | ".join(cells) + f" | {s:.3f} |")
    lines.append("| median | | " + " | ".join(f"{statistics.median(v):.3f}" for v in ratios.values()) + " |")
    return lines


def main() -> int:
    base_dir, new_dir = (Path(a) for a in sys.argv[1:3])
    out = []
    for name, fn in (("gemm_bench.json", _gemm), ("attention_bench.json", _attention)):
        b, n = base_dir / name, new_dir / name
        if b.exists() and n.exists():
            out += [f"## {name}", "", *fn(json.loads(b.read_text()), json.loads(n.read_text())), ""]
        else:
            out += [f"## {name}: missing ({b.exists()=}, {n.exists()=})", ""]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
