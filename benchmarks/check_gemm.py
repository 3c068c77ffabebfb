"""GPU correctness check for qcompile's fused dequant-GEMM kernels.

Fresh random inputs every run, NaN-poisoned output buffers (``QCOMPILE_GEMM_POISON=1``),
float64 references from ``qcompile.codegen.gemm.reference``, per-format relative
error bounds. Run it in the same device call as ``benchmarks/gemm.py``.
Exit status 1 if any case fails. ``--only int4-g128,int8-pc`` runs the named cases only.
"""

from __future__ import annotations

import os
import sys
import time

os.environ["QCOMPILE_GEMM_POISON"] = "1"

import torch  # noqa: E402

from qcompile.codegen.gemm import triton_quantized_linear  # noqa: E402
from qcompile.codegen.gemm.reference import random_quantized, reference_linear  # noqa: E402
from qcompile.formats.spec import QuantSpec  # noqa: E402

FP8_ACT = QuantSpec("fp8_e4m3", dynamic=True)
# (weight spec, act spec, relative Frobenius error bound vs float64)
CASES = [
    (QuantSpec("int4", 32, True), None, 1e-2),
    (QuantSpec("int4", 32, False), None, 1e-2),
    (QuantSpec("int4", 64, True), None, 1e-2),
    (QuantSpec("int4", 64, False), None, 1e-2),
    (QuantSpec("int4", 128, True), None, 1e-2),
    (QuantSpec("int4", 128, False, "bfloat16"), None, 1e-2),
    (QuantSpec("int4", 0, True), None, 1e-2),
    (QuantSpec("int8", 0, True), None, 1e-2),
    (QuantSpec("int8", 128, True), None, 1e-2),
    (QuantSpec("fp8_e4m3", 0, True, "float32"), None, 1e-2),
    (QuantSpec("fp4_e2m1", 32, True), None, 1e-2),
    (QuantSpec("nvfp4"), None, 1e-2),
    (QuantSpec("mxfp4"), None, 1e-2),
    (QuantSpec("mxfp8"), None, 1e-2),
    (QuantSpec("fp8_e4m3", 0, True, "float32"), FP8_ACT, 1e-2),
    (QuantSpec("int4", 128, False), FP8_ACT, 2e-2),  # W4A8
    (QuantSpec("int4", 32, True), FP8_ACT, 2e-2),  # W4A8
    (QuantSpec("nvfp4"), QuantSpec("nvfp4", dynamic=True), 2e-2),  # W4A4 (emulated on Hopper)
    (QuantSpec("mxfp4"), QuantSpec("mxfp4", dynamic=True), 2e-2),  # W4A4 via tl.dot_scaled
]
# (N, K) -> the Ms run on it. 1000: N not a tile multiple, K not a BLOCK_K multiple.
SHAPES = {(1000, 1000): [1, 3, 16, 33, 300], (4096, 4096): [1, 33]}
BIG = {(14336, 4096): [1, 16, 300]}  # int4 g128 sym only: the benchmark's main format
FULL = {"int4-g128", "int4-g32-asym", "int4-g64-asym", "int8-g128", "fp8_e4m3-pc+fp8_e4m3", "nvfp4", "int8-pc", "int4-g128-asym+fp8_e4m3", "mxfp4+mxfp4"}  # + fp16, epilogues


def main() -> int:
    only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None
    torch.manual_seed(int(time.time()))
    dev = "cuda"
    failures = 0
    worst: dict[str, float] = {}
    n_run = 0
    t0 = time.time()
    for spec, act, tol in CASES:
        name = spec.short() + (f"+{act.format}" if act else "")
        if only is not None and name not in only:
            continue
        shapes = dict(SHAPES)
        if name == "int4-g128":
            shapes.update(BIG)
        for (N, K), ms in shapes.items():
            qt = random_quantized(spec, N, K, dev)
            for M in ms:
                for dtype in (torch.bfloat16, torch.float16):
                    if dtype == torch.float16 and (name not in FULL or M not in (3, 300)):
                        continue
                    for epi in ("plain", "bias+res", "silu"):
                        if epi != "plain" and ((N, K) != (1000, 1000) or name not in FULL):
                            continue
                        x = torch.randn(M, K, device=dev, dtype=dtype)
                        kw: dict = {"act_spec": act}
                        if epi == "bias+res":
                            kw["bias"] = torch.randn(N, device=dev, dtype=dtype)
                            kw["residual"] = torch.randn(M, N, device=dev, dtype=dtype)
                        if epi == "silu":
                            kw["epilogue"] = "silu_mul"
                            kw["bias"] = torch.randn(N, device=dev, dtype=dtype)
                            kw["residual"] = torch.randn(M, N // 2, device=dev, dtype=dtype)
                        y = triton_quantized_linear(x, qt, **kw)
                        ref = reference_linear(x, qt, **kw)
                        err = ((y.double() - ref).norm() / ref.norm()).item()
                        emax = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                        bad = not (err < tol and emax < 4 * tol) or bool(torch.isnan(y).any())
                        worst[name] = max(worst.get(name, 0.0), err)
                        n_run += 1
                        if bad:
                            failures += 1
                            print(f"FAIL {name} N={N} K={K} M={M} {dtype} {epi}: rel={err:.2e} max={emax:.2e} "
                                  f"nan={int(torch.isnan(y).sum())}", flush=True)
        print(f"check {name:22s} worst rel err {worst[name]:.2e}  ({time.time() - t0:.0f}s)", flush=True)
    print(f"CHECK {'PASSED' if failures == 0 else f'FAILED ({failures} cases)'} ({n_run} cases, {time.time() - t0:.0f}s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
