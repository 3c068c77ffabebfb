"""GEMM benchmark on the GPU: qcompile's fused dequant-GEMM kernels against the peers
a user would otherwise call, all measured in one run.

Peers: cuBLAS bf16 (``torch.matmul``), PyTorch's tinygemm int4 (``aten._weight_int4pack_mm``,
group 128), cuBLASLt FP8 row-wise (``torch._scaled_mm``), and a copy-bandwidth floor
(bytes the kernel must move, at the copy bandwidth measured in this run).

    PYTHONUNBUFFERED=1 python benchmarks/gemm.py [--sweep] [--quick]

Writes ``docs/benchmarks/gemm-<device>.md`` (and JSON to $OUT when set).
Timings are medians of ``triton.testing.do_bench`` (L2 flushed between reps).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform

import torch
import triton
from triton.testing import do_bench

from qcompile.codegen.gemm import triton_quantized_linear
from qcompile.codegen.gemm.configs import GemmConfig, _split_k, pick_config
from qcompile.codegen.gemm.reference import random_quantized
from qcompile.formats.spec import QuantSpec

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
MS = [1, 4, 16, 64, 256, 2048]
W4 = QuantSpec("int4", 128, True)
W8 = QuantSpec("int8", 0, True)
F8 = QuantSpec("fp8_e4m3", 0, True, "float32")
FP8_ACT = QuantSpec("fp8_e4m3", dynamic=True)


def bench(fn) -> float:
    """Median microseconds."""
    return do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3


def bench_graph(make_call, nbytes: int) -> float:
    """GPU microseconds per call, launch overhead excluded: a CUDA graph replays R calls,
    each on its own copy of the weights (R * bytes >= 3x L2), so every call reads HBM."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    copies = max(1, min(32, -(-3 * l2 // max(nbytes, 1))))
    calls = [make_call(i) for i in range(copies)]
    for c in calls:
        c()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph, calls
    return sorted(times)[len(times) // 2] * 1e3 / copies


def copy_bandwidth() -> float:
    x = torch.empty(1024**3 // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x))
    return 2 * 1024**3 / (t * 1e-6)  # bytes / s


def sweep(out_rows: list) -> None:
    """Graph-timed candidate tile configs for W4A16 (how configs.py was chosen).
    ``split_k=0`` means: split K like the heuristic does for that tile shape."""
    C = GemmConfig
    cands = {
        1: [C(1, 32, 256, 0), C(1, 16, 256, 0), C(1, 64, 128, 0), C(1, 32, 128, 0), C(1, 64, 256, 0, num_warps=8),
            C(16, 32, 256, 0), C(16, 64, 256, 0), C(1, 32, 256, 1)],
        16: [C(16, 32, 256, 0), C(16, 64, 256, 0), C(16, 32, 128, 0), C(16, 64, 128, 0), C(16, 128, 128, 0)],
        64: [C(64, 64, 128, 0, 8), C(32, 64, 128, 0, 8), C(64, 128, 64, 0, 8), C(64, 64, 128, 1, 8),
             C(64, 32, 128, 0, 8), C(64, 64, 64, 0, 8)],
        4: [C(1, 32, 256, 0), C(16, 32, 256, 0), C(16, 64, 256, 0)],
    }
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for N, K in [(14336, 4096), (4096, 14336)]:
        qts = [random_quantized(W4, N, K, "cuda") for _ in range(4)]
        nbytes = qts[0].nbytes()
        for M, cfgs in cands.items():
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            for c in cfgs:
                if c.split_k == 0:
                    tiles = triton.cdiv(N, c.block_n) * triton.cdiv(M, c.block_m)
                    c = dataclasses.replace(c, split_k=_split_k(tiles, triton.cdiv(K, c.block_k), 2 * sms))
                try:
                    t = bench_graph(lambda i, c=c, x=x, qts=qts: (lambda: triton_quantized_linear(x, qts[i % 4], config=c)),
                                    nbytes * 4)
                except Exception as e:  # noqa: BLE001
                    print("sweep fail", c, repr(e)[:200])
                    continue
                out_rows.append({"N": N, "K": K, "M": M, "cfg": c.__dict__, "us": t})
                print(f"sweep N={N} K={K} M={M} {c} {t:.1f}us", flush=True)


def bench_shape(N: int, K: int, ms: list[int], bw: float) -> list[dict]:
    """All peers and our kernels on one weight shape: eager (do_bench) and CUDA-graph timings."""
    dev = "cuda"
    rows = []
    W = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
    wq = torch.randint(0, 16, (N, K), device=dev, dtype=torch.int32)
    tiny = torch.ops.aten._convert_weight_to_int4pack((wq[:, ::2] << 4 | wq[:, 1::2]).to(torch.uint8), 8)
    del wq
    sz = torch.rand(K // 128, N, 2, device=dev, dtype=torch.bfloat16)
    Wf8 = W.to(torch.float8_e4m3fn)
    sb = torch.rand(1, N, device=dev) + 0.5
    q4 = random_quantized(W4, N, K, dev)
    q8 = random_quantized(W8, N, K, dev)
    qf8 = random_quantized(F8, N, K, dev)
    # weight copies for the graph timings (L2-cold): views are enough, the bytes are distinct tensors
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)

    def copies_of(t, make):
        n = max(1, min(32, -(-3 * l2 // t)))
        return [make() for _ in range(n)]

    Ws = [W] + copies_of(W.numel() * 2, lambda: W.clone())[1:]
    tinys = [tiny] + copies_of(q4.nbytes(), lambda: tiny.clone())[1:]
    f8s = [Wf8] + copies_of(Wf8.numel(), lambda: Wf8.clone())[1:]
    q4s = [q4] + copies_of(q4.nbytes(), lambda: random_quantized(W4, N, K, dev))[1:]
    q8s = [q8] + copies_of(q8.nbytes(), lambda: random_quantized(W8, N, K, dev))[1:]
    qf8s = [qf8] + copies_of(qf8.nbytes(), lambda: random_quantized(F8, N, K, dev))[1:]
    for M in ms:
        X = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        Xf8 = X.to(torch.float8_e4m3fn)
        sa = torch.rand(M, 1, device=dev) + 0.5
        calls = {
            "bf16": (Ws, lambda w: X @ w.t(), W.numel() * 2),  # noqa: B023
            "tinygemm_w4": (tinys, lambda w: torch.ops.aten._weight_int4pack_mm(X, w, 128, sz), q4.nbytes()),  # noqa: B023
            "scaled_mm_fp8": (f8s, lambda w: torch._scaled_mm(Xf8, w.t(), scale_a=sa, scale_b=sb,  # noqa: B023
                                                             out_dtype=torch.bfloat16), Wf8.numel()),
            "ours_w4a16": (q4s, lambda w: triton_quantized_linear(X, w), q4.nbytes()),  # noqa: B023
            "ours_w8a16": (q8s, lambda w: triton_quantized_linear(X, w), q8.nbytes()),  # noqa: B023
            "ours_fp8": (qf8s, lambda w: triton_quantized_linear(X, w, act_spec=FP8_ACT), qf8.nbytes()),  # noqa: B023
        }
        r: dict = {"N": N, "K": K, "M": M}
        for name, (ws, fn, nbytes) in calls.items():
            r[name] = bench(lambda fn=fn, ws=ws: fn(ws[0]))
            r[name + "_graph"] = bench_graph(lambda i, fn=fn, ws=ws: (lambda: fn(ws[i % len(ws)])), nbytes)
        act = M * K * 2 + M * N * 2
        r["w4_floor"] = (q4.nbytes() + act) / bw * 1e6
        r["w8_floor"] = (q8.nbytes() + act) / bw * 1e6
        r["cfg_w4"] = pick_config(M, N, K, "w4", 128, torch.cuda.get_device_properties(0).multi_processor_count).__dict__
        rows.append(r)
        print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                       if k != "cfg_w4"), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--quick", action="store_true", help="two shapes, three Ms")
    args = ap.parse_args()
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"device {name}; copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    shapes = SHAPES[:2] if args.quick else SHAPES
    ms = [1, 16, 2048] if args.quick else MS
    rows = []
    for N, K in shapes:
        rows += bench_shape(N, K, ms, bw)
        torch.cuda.empty_cache()
    meta = {
        "device": name, "copy_TBps": bw / 1e12, "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gemm_bench.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    write_markdown(meta, rows)
    if args.sweep:  # after the table, so a time limit never costs the table
        sweep_rows: list = []
        sweep(sweep_rows)
        if out:
            with open(os.path.join(out, "gemm_sweep.json"), "w") as f:
                json.dump(sweep_rows, f, indent=1)


def write_markdown(meta: dict, rows: list) -> str:
    slug = meta["device"].lower().replace("nvidia ", "").replace(" ", "-")
    lines = [
        f"# GEMM benchmark: {meta['device']}",
        "",
        f"Date {meta['date']}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
        f"Python {meta['python']}. Copy bandwidth measured in the same run: {meta['copy_TBps']:.2f} TB/s.",
        "Generated by `benchmarks/gemm.py`; the correctness check `benchmarks/check_gemm.py` ran in the same "
        "device call. Times in µs.",
        "",
        "Columns: `bf16` cuBLAS `torch.matmul`; `tiny_w4` `aten._weight_int4pack_mm` g128; "
        "`fp8` cuBLASLt `torch._scaled_mm` row-wise; `w4a16` ours int4 g128 sym; `w8a16` ours int8 per-channel; "
        "`w8a8` ours FP8 e4m3 per-channel weights × per-token activations (its quantization kernel included); "
        "`w4floor`/`w8floor` = our weight bytes + scales + activations + output moved once at the copy bandwidth.",
        "",
        "## GPU time (CUDA-graph replay, launch overhead excluded)",
        "",
        "Each graph replays R calls on R distinct weight copies (R × weight bytes ≥ 3× L2), so every call "
        "reads its weights from HBM; the same method for peers and ours. This is what a generate loop "
        "captured in a CUDA graph sees.",
        "",
        "| N | K | M | bf16 | tiny_w4 | fp8 | w4a16 | w4/floor | tiny/w4 | w4/bf16 | w4floor "
        "| w8a16 | w8/floor | w8a8 | w8a8/fp8 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        g = {k[:-6]: v for k, v in r.items() if k.endswith("_graph")}
        lines.append(
            f"| {r['N']} | {r['K']} | {r['M']} | {g['bf16']:.1f} | {g['tinygemm_w4']:.1f} | {g['scaled_mm_fp8']:.1f} "
            f"| {g['ours_w4a16']:.1f} | {g['ours_w4a16'] / r['w4_floor']:.2f}× | {g['tinygemm_w4'] / g['ours_w4a16']:.2f}× "
            f"| {g['ours_w4a16'] / g['bf16']:.2f}× | {r['w4_floor']:.1f} | {g['ours_w8a16']:.1f} "
            f"| {g['ours_w8a16'] / r['w8_floor']:.2f}× | {g['ours_fp8']:.1f} | {g['ours_fp8'] / g['scaled_mm_fp8']:.2f}× |")
    lines += [
        "",
        "## Eager calls (`triton.testing.do_bench` medians, L2 flushed between reps)",
        "",
        "Includes each call's CPU launch cost where the GPU would otherwise wait (our Python dispatch and "
        "Triton's launcher, several launches for split-K and W8A8).",
        "",
        "| N | K | M | bf16 | tiny_w4 | fp8 | w4a16 | w8a16 | w8a8 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['N']} | {r['K']} | {r['M']} | {r['bf16']:.1f} | {r['tinygemm_w4']:.1f} "
                     f"| {r['scaled_mm_fp8']:.1f} | {r['ours_w4a16']:.1f} | {r['ours_w8a16']:.1f} | {r['ours_fp8']:.1f} |")
    text = "\n".join(lines) + "\n"
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks", f"gemm-{slug}.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"gemm-{slug}.md"), "w") as f:
            f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
