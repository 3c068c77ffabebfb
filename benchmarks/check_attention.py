"""GPU correctness of compressed-KV decode attention (run before the benchmark).

For every format (rotation off/on, pre-RoPE, mixed key/value formats, groups), uneven row
lengths, 1 and 4 query tokens: ``decode_attention`` (output poisoned with NaN first) against the
float64 reference on the same dequantized cache; the Triton append against the torch append.
The accuracy of each format against a bf16 cache is ``benchmarks/kv_accuracy.py``'s.

    python benchmarks/check_attention.py [--json out.json] [--only int4-g64,fp8_e4m3]

Prints a summary table last; with ``$OUT`` (or ``--out-dir``) set it also writes
``check_attention.json`` and ``check_attention.md`` there. Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from qcompile.codegen.attention import decode_attention, reference_decode_attention
from qcompile.runtime import KV_FORMATS, KVCacheSpec, QuantizedKVCache, prefill_attention

CK_SHAPE = (3, 2, 8, 128, 700)
CK_LENS = [517, 130, 64]
SPECS = [KVCacheSpec(f, rotate_keys=r) for f in KV_FORMATS for r in (False, True)] + [
    KVCacheSpec("int4", pre_rope=True), KVCacheSpec("int2", pre_rope=True),
    KVCacheSpec("int4", group_size=32), KVCacheSpec("int4", group_size=128),
    KVCacheSpec("int4", value_group_size=32), KVCacheSpec("int4", value_group_size=32, rotate_keys=True),
    KVCacheSpec("int2", group_size=32, value_group_size=32, rotate_keys=True),
    KVCacheSpec("int4", value_format="bf16"), KVCacheSpec("int4", value_format="bf16", rotate_keys=True),
    KVCacheSpec("bf16", value_format="int4"), KVCacheSpec("bf16", value_format="int4", value_group_size=32),
    KVCacheSpec("int4", value_format="int8", rotate_keys=True),
    KVCacheSpec("fp8_e4m3", value_format="bf16"), KVCacheSpec("bf16", value_format="fp8_e4m3"),
]


def outlier_keys(B: int, H: int, T: int, D: int, gen: torch.Generator, device,
                 n_outliers: int = 4) -> torch.Tensor:
    """Gaussian keys with a few channels per head 10-50x larger (fixed per head, like real keys)."""
    k = torch.randn(B, H, T, D, generator=gen, device=device)
    for h in range(H):
        ch = torch.randperm(D, generator=gen, device=device)[:n_outliers]
        k[:, h, :, ch] *= 10 + 40 * torch.rand(n_outliers, generator=gen, device=device)
    return k


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def check_kernels(device: str, gen: torch.Generator) -> list[dict]:
    rows = []
    B, Hkv, Hq, D, S = CK_SHAPE
    for spec in SPECS:
        caches = {impl: QuantizedKVCache(1, B, S, Hkv, D, spec, device=device, impl=impl)
                  for impl in ("triton", "torch")}
        lens = torch.tensor(CK_LENS, device=device)
        T0 = int(lens.max())
        k = outlier_keys(B, Hkv, T0, D, gen, device).bfloat16()
        v = torch.randn(B, Hkv, T0, D, generator=gen, device=device).bfloat16()
        q = torch.randn(B, Hq, T0, D, generator=gen, device=device).bfloat16()
        for c in caches.values():
            prefill_attention(q, k, v, c, 0, lens)
        worst, app = 0.0, 0.0
        for T in (1, 4, 1, 3):
            kn = outlier_keys(B, Hkv, T, D, gen, device).bfloat16()
            vn = torch.randn(B, Hkv, T, D, generator=gen, device=device).bfloat16()
            for c in caches.values():
                c.append(0, kn, vn)
            qn = torch.randn(B, Hq, T, D, generator=gen, device=device).bfloat16()
            out = torch.full_like(qn, float("nan"))
            decode_attention(qn, caches["triton"], 0, out=out)
            ref = reference_decode_attention(qn, caches["triton"], 0)
            worst = max(worst, rel(out, ref) if torch.isfinite(out).all() else float("inf"))
        kt, vt = caches["triton"].dequantize(0)
        kr, vr = caches["torch"].dequantize(0)
        app = max(rel(kt, kr), rel(vt, vr))
        ok = worst < 1e-2 and app < 2e-2
        rows.append(dict(spec=spec.short(), decode_vs_fp64=worst, append_triton_vs_torch=app, ok=ok))
        print(f"check {spec.short():28s} decode rel err {worst:.2e}  append diff {app:.2e}  "
              f"{'ok' if ok else 'FAIL'}", flush=True)
    return rows


def render(checks: list[dict], device: str) -> str:
    """Markdown summary, one row per spec."""
    lines = [f"Decode attention checks on {device}: decode vs float64 reference on the same cache "
             "(NaN-poisoned output), Triton vs torch append.",
             "",
             "| spec | decode rel err | append diff | ok |",
             "|---|---:|---:|---|"]
    for r in checks:
        lines.append(f"| {r['spec']} | {r['decode_vs_fp64']:.1e} | {r['append_triton_vs_torch']:.1e} | "
                     f"{'ok' if r['ok'] else 'FAIL'} |")
    n_ok = sum(r["ok"] for r in checks)
    lines += ["", f"{n_ok}/{len(checks)} kernel checks pass."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--out-dir", default=os.environ.get("OUT"))
    ap.add_argument("--only", default=None, help="comma-separated spec names (as in the table)")
    args = ap.parse_args()
    if args.only:
        keep = set(args.only.split(","))
        SPECS[:] = [s for s in SPECS if s.short() in keep]
    t0 = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(1234)
    checks = check_kernels(device, gen)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    md = render(checks, name)
    data = dict(device=name, checks=checks)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "check_attention.json"), "w") as f:
            json.dump(data, f, indent=1)
        with open(os.path.join(args.out_dir, "check_attention.md"), "w") as f:
            f.write(md)
    print(md)
    print(f"total {time.time() - t0:.0f}s")
    return 0 if all(r["ok"] for r in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
