"""GPTQ's cost on the GPU: ``gptq_quantize`` on one Llama-3-8B-sized layer (14336×4096 and
4096×14336), int4 g128, against round-to-nearest of the same weight.

    python benchmarks/gptq_speed.py            # needs CUDA; prints a table, writes $OUT/gptq_speed.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qcompile.formats import QuantSpec, quantize  # noqa: E402
from qcompile.passes.gptq_math import gptq_quantize  # noqa: E402


def _time(fn, repeats: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    dev = "cuda"
    torch.manual_seed(0)
    rows = []
    for n, k in ((14336, 4096), (4096, 14336)):
        w = torch.randn(n, k, device=dev)
        x = torch.randn(2048, k, device=dev) @ (torch.eye(k, device=dev) + 0.05 * torch.randn(k, k, device=dev))
        h = x.t() @ x
        for spec in (QuantSpec("int4", 128, symmetric=False), QuantSpec("nvfp4")):
            t_gptq = _time(lambda w=w, h=h, spec=spec: gptq_quantize(w, h, spec))
            t_rtn = _time(lambda w=w, spec=spec: quantize(w, spec))
            _, info = gptq_quantize(w, h, spec)
            rows.append({"N": n, "K": k, "spec": spec.short(), "gptq_s": t_gptq, "rtn_s": t_rtn,
                         "loss_ratio": info.loss_ratio})
            print(f"{n}x{k} {spec.short():14s} GPTQ {t_gptq:.3f} s  RTN {t_rtn * 1e3:.1f} ms  "
                  f"proxy loss GPTQ/RTN {info.loss_ratio:.3f}", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gptq_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
