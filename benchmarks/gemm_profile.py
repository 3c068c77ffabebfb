"""One int_mma GEMM launched a few times, for Nsight Compute (stall reasons, memory throughput):

    ncu -k regex:int_mma --launch-skip 3 --launch-count 1 --section WarpStateStats \\
        --section SchedulerStats --section SpeedOfLight python benchmarks/gemm_profile.py 1 14336 4096
"""

from __future__ import annotations

import sys

import torch

from qcompile.codegen.gemm import triton_quantized_linear
from qcompile.codegen.gemm.reference import random_quantized
from qcompile.formats.spec import QuantSpec

if __name__ == "__main__":
    M, N, K = (int(a) for a in sys.argv[1:4])
    spec = QuantSpec("int4", 128, True) if len(sys.argv) < 5 else QuantSpec(sys.argv[4], 128 if sys.argv[4] == "int4" else 0, True)
    qt = random_quantized(spec, N, K, "cuda")
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    cfg = None
    if len(sys.argv) > 5:  # block_m block_n block_k split_k num_warps num_stages
        from qcompile.codegen.gemm.configs import GemmConfig

        bm, bn, bk, sk, nw, ns = (int(a) for a in sys.argv[5].split(","))
        cfg = GemmConfig(bm, bn, bk, sk, 8, nw, ns)
    for _ in range(5):
        triton_quantized_linear(x, qt, config=cfg)
    torch.cuda.synchronize()
    print("done")
