"""GPU benchmark: the online rotation ``qcompile::hadamard_transform`` (Triton FWHT,
``qcompile/codegen/hadamard``) against the bf16 GEMM it precedes.

For each input size K (4096; 11008 = 32·344, Llama-2 down_proj; 14336 = 512·28, Llama-3 down_proj)
and M (decode 1 and 16, prefill 2048) it checks the kernel against the float64 reference, then
times, in CUDA graphs (``triton.testing.do_bench_cudagraph``; plain ``do_bench`` if capture fails):

- ``triton``: the host wrapper ``triton_hadamard_transform`` (what the op runs on CUDA);
- ``op``: ``torch.ops.qcompile.hadamard_transform`` through the dispatcher;
- ``torch_ref``: the reference (``formats.orthogonal.hadamard_transform``: chunked ±1 matmuls);
- ``dense``: ``x @ Q`` with Q as a dense bf16 K×K matrix (the naive alternative);
- ``gemm``: ``torch.matmul(x, W.T)``, W the N×K bf16 weight of the linear the transform precedes.

Prints a table and writes ``$OUT/hadamard.json`` (or ``--out``). Run on the device machine:

    python benchmarks/hadamard.py            # H200: about a minute
    python benchmarks/hadamard.py --group 128   # the grouped transform (rotate_online(group_size=128))
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GEMMS = {4096: 4096, 11008: 4096, 14336: 4096}
"""Input size K -> output size N of the linear that reads the rotated input (o_proj / down_proj)."""
MS = (1, 16, 2048)


def bench(fn, rep: int) -> tuple[float, str]:
    """Median time of ``fn`` in microseconds and the method used."""
    from triton.testing import do_bench, do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    try:
        return 1e3 * do_bench_cudagraph(fn, rep=rep, return_mode="median"), "cudagraph"
    except Exception as e:  # noqa: BLE001 - capture can fail for host-synchronizing paths
        print(f"  (CUDA graph capture failed: {type(e).__name__}: {e}; timing without graphs)", file=sys.stderr)
        torch.cuda.synchronize()
        return 1e3 * do_bench(fn, rep=rep, return_mode="median"), "do_bench"


def _measure(x, signs, block, scale, groups, q_dense, w, rep) -> tuple[dict[str, float], str]:
    from qcompile.codegen.hadamard import cuda_hadamard_transform
    from qcompile.formats.orthogonal import hadamard_transform
    from qcompile.ir.ops import HADAMARD_TRANSFORM

    t = {}
    t["triton"], how = bench(lambda: cuda_hadamard_transform(x, signs, block, scale, groups), rep)
    t["op"], _ = bench(lambda: HADAMARD_TRANSFORM(x, signs, block, scale, groups), rep)
    t["torch_ref"], _ = bench(lambda: hadamard_transform(x, signs, block, scale, groups), rep)
    t["dense"], _ = bench(lambda: x @ q_dense, rep)
    t["gemm"], _ = bench(lambda: torch.matmul(x, w.t()), rep)
    return t, how


def run(dims: list[int], ms: list[int], rep: int, seed: int = 0, device: str = "cuda",
        group: int | None = None) -> list[dict]:
    """``group``: the grouped transform ``I ⊗ Q_group`` (``rotate_online(group_size=...)``) instead of
    the whole-K rotation."""
    from qcompile.codegen.hadamard import cuda_hadamard_transform, launch_config
    from qcompile.formats.orthogonal import describe, grouped_rotation_factors, rotation_factors
    from qcompile.ir.ops import HADAMARD_TRANSFORM

    dev = torch.device(device)
    rows = []
    for k in dims:
        n_out = GEMMS.get(k, 4096)
        rot = grouped_rotation_factors(k, group, seed=seed) if group else rotation_factors(k, seed=seed)
        signs = rot.signs.float().to(dev)
        block = rot.block.float().to(dev) if rot.block is not None else None
        scale = float(rot.scale)
        q_dense = rot.matrix().to(dev, torch.bfloat16)
        w = (torch.randn(n_out, k, device=dev) / math.sqrt(k)).to(torch.bfloat16)
        cfg = launch_config(k // rot.groups, block.shape[0] if block is not None else 1)
        for m in ms:
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            y = cuda_hadamard_transform(x, signs, block, scale, rot.groups)
            ref = rot.apply(x.double().cpu())
            err = float((y.double().cpu() - ref).abs().max() / ref.abs().max())
            y_op = HADAMARD_TRANSFORM(x, signs, block, scale, rot.groups)
            same = bool(torch.equal(y_op, y))
            t, how = _measure(x, signs, block, scale, rot.groups, q_dense, w, rep)
            moved = 2 * m * k * x.element_size()
            rows.append({
                "K": k, "N": n_out, "M": m, "construction": rot.describe() if group else describe(k), "config": cfg,
                "timing": how,
                "max_rel_error_vs_float64": err, "op_matches_wrapper": same,
                "us": {name: round(v, 3) for name, v in t.items()},
                "transform_over_gemm": round(t["triton"] / t["gemm"], 4),
                "triton_gbps": round(moved / (t["triton"] * 1e-6) / 1e9, 1),
                "gemm_tflops": round(2 * m * k * n_out / (t["gemm"] * 1e-6) / 1e12, 1),
            })
            r = rows[-1]
            print(f"K={k:6d} M={m:5d}  triton {t['triton']:8.2f} us  op {t['op']:8.2f}  ref {t['torch_ref']:8.2f}  "
                  f"dense {t['dense']:8.2f}  gemm {t['gemm']:8.2f} us  ratio {r['transform_over_gemm']:.3f}  "
                  f"{r['triton_gbps']:7.1f} GB/s  err {err:.1e}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| K | M | Hadamard | triton µs | op µs | torch ref µs | dense x·Q µs | bf16 GEMM µs (N×K) | "
            "triton / GEMM | triton GB/s | max rel. error |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        u = r["us"]
        lines.append(f"| {r['K']} | {r['M']} | {r['construction'].split(':')[0]} | {u['triton']:.2f} | {u['op']:.2f} | "
                     f"{u['torch_ref']:.2f} | {u['dense']:.2f} | {u['gemm']:.2f} ({r['N']}×{r['K']}) | "
                     f"{r['transform_over_gemm']:.3f} | {r['triton_gbps']:.0f} | {r['max_rel_error_vs_float64']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", type=int, nargs="*", default=list(GEMMS))
    ap.add_argument("--ms", type=int, nargs="*", default=list(MS))
    ap.add_argument("--rep", type=int, default=200, help="milliseconds of timing per measurement")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--group", type=int, default=None, help="time the grouped transform I ⊗ Q_group instead")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/hadamard.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    rows = run(args.dims, args.ms, args.rep, group=args.group)
    print()
    print(table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "rows": rows, "table": table(rows)}
    name = f"hadamard-group{args.group}.json" if args.group else "hadamard.json"
    (out / name).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out / name}")
    bad = [r for r in rows if r["max_rel_error_vs_float64"] > 2e-2 or not r["op_matches_wrapper"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
