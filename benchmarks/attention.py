"""Decode attention over a compressed KV cache, against torch SDPA on a bf16 cache, in one run.

For each (batch, context): torch SDPA on a bf16 cache, our kernel on a bf16 cache (kernel quality
apart from compression), our kernel on each compressed format, and each format's bytes floor
(cache bytes read once at the copy bandwidth measured in this run). Hq=32, Hkv=8, head dim 128,
one query token. Times are medians of CUDA-graph replays (triton.testing.do_bench_cudagraph);
every timed configuration's output is first NaN-poisoned and compared with a float32 reference on
the same dequantized cache.

    python benchmarks/attention.py --sweep-only   # launch-config sweep at (8, 8192), (8, 32768)
    python benchmarks/attention.py --merge        # fused or separate split merge, whole grid
    python benchmarks/attention.py [--quick]      # full grid (after the sweep unless --quick)
    python benchmarks/attention.py --sass [--sass-ref REV]   # no GPU: sm_90 SASS statistics

``--sweep-only`` takes about 3-4 minutes on one H100 (about 25 compiles). The full run also
writes docs/benchmarks/attention-<device>.md. JSON and markdown go to ``--out-dir`` or ``$OUT``.
``--sass`` compiles the kernel for sm_90 ahead of time (any machine, Triton's own ptxas) and
prints, per format, the main loop's instructions per cache element, conversions, shared-memory
traffic, registers and spills; ``--sass-ref HEAD~1`` adds the kernel of that git revision.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from check_attention import outlier_keys  # noqa: E402

from qcompile.codegen.attention import decode_attention  # noqa: E402
from qcompile.codegen.attention.launch import (  # noqa: E402
    MIN_SPLIT_TOKENS,
    fuses_merge,
    kernel_paths,
    launch_config,
    split_tokens,
)
from qcompile.formats.hadamard import rotate  # noqa: E402
from qcompile.formats.kernel_codes import KV_CODES  # noqa: E402
from qcompile.runtime import KVCacheSpec, QuantizedKVCache  # noqa: E402

GRID = [(1, 8192), (8, 8192), (32, 4096), (8, 32768), (1, 131072)]
SWEEP_SHAPES = [(8, 8192), (8, 32768)]
HQ, HKV, D = 32, 8, 128
FORMATS = {
    "bf16": KVCacheSpec("bf16"),
    "fp8": KVCacheSpec("fp8_e4m3"),
    "int8": KVCacheSpec("int8"),
    "int4": KVCacheSpec("int4"),
    "int4-rot": KVCacheSpec("int4", rotate_keys=True),
    "int2": KVCacheSpec("int2"),
}
TARGET = {"fp8": 1.3, "int4": 1.4, "int4-rot": 1.4, "int2": 1.6}
ERR_TOL = 1e-2
DEVICE = "cuda"


def candidates(name: str) -> list[dict]:
    """Launch configurations the sweep times for a format. ``per_sm``: programs per SM, turned
    into a split count per shape the way ``launch_config`` does it (so the best generalizes to
    the grid's other batch sizes); configs that differ only in ``per_sm`` share one compile."""
    if name == "bf16":
        return [dict(block_n=bn, num_warps=4, num_stages=3, per_sm=p) for bn in (32, 64) for p in (1, 2)]
    if name.endswith("-rot"):
        base = dict(block_n=32, num_warps=1, num_stages=3, per_sm=8)
        return [base, dict(base, num_stages=2, per_sm=12, maxnreg=168), dict(base, per_sm=12, maxnreg=168)]
    if name in ("fp8", "int8"):
        base = dict(block_n=64, num_warps=1, num_stages=2, per_sm=4)
        return [base, dict(base, per_sm=3), dict(base, per_sm=6, maxnreg=168)]
    # registers capped (spills) for 12 or 16 programs per SM; two stages so that their shared
    # memory fits
    base = dict(block_n=64, num_warps=1, num_stages=2, per_sm=8)
    return [base, dict(base, num_stages=3), dict(base, per_sm=12, maxnreg=168),
            dict(base, per_sm=16, maxnreg=128)]


def merge_candidates(name: str) -> list[dict]:
    """``--merge``: the default tile configs with the split merge fused (last program of a head)
    or in a second kernel (the default's choice), at fewer programs per SM, and with other
    shortest splits than ``MIN_SPLIT_TOKENS`` (the number of programs at batch 1)."""
    if name == "bf16":
        base, alt = dict(block_n=32, num_warps=4, num_stages=3, per_sm=2), [1]
    elif name in ("fp8", "int8"):
        base, alt = dict(block_n=64, num_warps=1, num_stages=2, per_sm=4), [8]
    else:
        base = dict(block_n=32 if name.endswith("-rot") else 64, num_warps=1, num_stages=3, per_sm=8)
        alt = [4]
    out = [dict(base), dict(base, fused_reduce=True)]
    out += [dict(base, per_sm=p) for p in alt]
    return out + [dict(base, min_tokens=t) for t in (64, 256)]


# ----------------------------------------------------------------------------- GPU helpers
def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, read + write counted."""
    from triton.testing import do_bench
    x = torch.randn(1 << 28, device="cuda")          # 1 GiB
    y = torch.empty_like(x)
    t = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median") * 1e-3
    return 2 * (1 << 28) * 4 / t


def bench(fn, rep: int = 100) -> float:
    """Median microseconds of CUDA-graph replays."""
    from triton.testing import do_bench_cudagraph
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3


def tensors(B: int, ctx: int, gen: torch.Generator):
    k = outlier_keys(B, HKV, ctx, D, gen, DEVICE).bfloat16()
    v = torch.randn(B, HKV, ctx, D, generator=gen, device=DEVICE).bfloat16()
    q = torch.randn(B, HQ, D, generator=gen, device=DEVICE).bfloat16()
    return k, v, q


def build(spec: KVCacheSpec, B: int, ctx: int, k: torch.Tensor, v: torch.Tensor) -> QuantizedKVCache:
    c = QuantizedKVCache(1, B, ctx, HKV, D, spec, device=DEVICE)
    step = 8192
    for t0 in range(0, ctx, step):
        c.append(0, k[:, :, t0:t0 + step], v[:, :, t0:t0 + step])
    return c


def reference(c: QuantizedKVCache, q: torch.Tensor) -> torch.Tensor:
    """Float32 attention of q [B, Hq, D] over the dequantized cache (GQA without repeats)."""
    kd, vd = c.dequantize(0, torch.float32)
    qf = q.float()
    if c.spec.rotate_keys:
        qf = rotate(qf)
    B = q.shape[0]
    qg = qf.view(B, HKV, HQ // HKV, D)
    logits = (qg @ kd.transpose(-1, -2)) * D ** -0.5        # [B, Hkv, G, S]
    out = torch.softmax(logits, -1) @ vd
    del kd, vd, logits
    return out.reshape(B, HQ, D)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def sm_count() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count


def kwargs_for(c: QuantizedKVCache, B: int, ctx: int, cfg: dict | None) -> dict:
    """Explicit launch arguments: ``cfg``'s, or (``None``) the library's own defaults, with the
    split count ``decode_attention`` actually launches and where it merges them."""
    if cfg is None:
        lc = launch_config(c.spec, D, B, HKV, ctx, sm_count())
        return dict(block_n=lc.block_n, num_warps=lc.num_warps, num_stages=lc.num_stages,
                    num_splits=split_tokens(ctx, lc.num_splits, lc.block_n)[1], fused_reduce=lc.fused_merge)
    bn = cfg["block_n"]
    if c.spec.grouped_keys:
        bn = min(bn, c.spec.group_size)
    min_tokens = max(cfg.get("min_tokens", MIN_SPLIT_TOKENS), bn)
    splits = max(1, min(int(sm_count() * cfg["per_sm"]) // (B * HKV), -(-ctx // min_tokens)))
    splits = split_tokens(ctx, splits, bn)[1]
    fused = cfg.get("fused_reduce", fuses_merge(c.spec, splits))
    kw = dict(block_n=bn, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
              num_splits=splits, fused_reduce=fused)
    return dict(kw, maxnreg=cfg["maxnreg"]) if cfg.get("maxnreg") else kw


def run_candidate(c: QuantizedKVCache, q: torch.Tensor, ref: torch.Tensor, kw: dict) -> tuple[float, float]:
    """(median µs, relative error of the NaN-poisoned output against ``ref``)."""
    out = torch.full_like(q, float("nan"))
    decode_attention(q, c, 0, out=out, impl="triton", **kw)
    err = rel(out, ref) if torch.isfinite(out).all() else float("inf")
    t = bench(lambda: decode_attention(q, c, 0, out=out, impl="triton", **kw), rep=60)
    return t, err


def time_sdpa(q4: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
    try:
        return bench(lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True))
    except Exception as e:  # noqa: BLE001
        print(f"SDPA with enable_gqa failed ({type(e).__name__}); timing repeated KV heads")
        kr, vr = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
        return bench(lambda: F.scaled_dot_product_attention(q4, kr, vr))


def floor_us(spec: KVCacheSpec, B: int, ctx: int, bw: float) -> float:
    return B * HKV * ctx * spec.bytes_per_token(D) / bw * 1e6


# ----------------------------------------------------------------------------- sweep
def _compile_one(job: tuple[str, dict]) -> str:
    """Worker: run one (format, config) on a tiny cache so that Triton's disk cache holds the
    kernels the sweep will launch (same constexprs and argument specializations)."""
    name, cfg = job
    try:
        spec = FORMATS[name]
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        ctx = 1024
        k, v, q = tensors(1, ctx, gen)
        c = build(spec, 1, ctx, k, v)
        bn = min(cfg["block_n"], spec.group_size) if spec.grouped_keys else cfg["block_n"]
        decode_attention(q, c, 0, block_n=bn, num_warps=cfg["num_warps"],
                         num_stages=cfg["num_stages"], num_splits=2, maxnreg=cfg.get("maxnreg"))
        torch.cuda.synchronize()
        return f"{name} {cfg}: ok"
    except Exception as e:  # noqa: BLE001  (reported, the sweep will report it again)
        return f"{name} {cfg}: {type(e).__name__}: {e}"[:200]


def precompile(names: list[str], workers: int, cands=candidates) -> None:
    """Compile every distinct sweep kernel in parallel processes (Triton compiles serially in
    one process; on a fresh machine that would be most of the sweep's time)."""
    import concurrent.futures
    import multiprocessing
    jobs, seen = [], set()
    for name in names:
        for cfg in cands(name):
            key = (name, cfg["block_n"], cfg["num_warps"], cfg["num_stages"], cfg.get("maxnreg"))
            if key not in seen:
                seen.add(key)
                jobs.append((name, cfg))
    t0 = time.time()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
        for msg in ex.map(_compile_one, jobs):
            if not msg.endswith("ok"):
                print(f"precompile {msg}", flush=True)
    print(f"precompiled {len(jobs)} configurations in {time.time() - t0:.0f}s ({workers} processes)",
          flush=True)


def sweep(bw: float, gen: torch.Generator, names: list[str], cands=candidates,
          shapes=SWEEP_SHAPES) -> tuple[dict, list[dict]]:
    """Time every candidate at every sweep shape; best config per format (summed over shapes)."""
    log: list[dict] = []
    for B, ctx in shapes:
        k, v, q = tensors(B, ctx, gen)
        sdpa = time_sdpa(q[:, :, None], k, v)
        print(f"-- B={B} ctx={ctx}: SDPA bf16 {sdpa:.1f} us", flush=True)
        for name in names:
            spec = FORMATS[name]
            c = build(spec, B, ctx, k, v)
            ref = reference(c, q)
            fl = floor_us(spec, B, ctx, bw)
            for cfg in cands(name):
                kw = kwargs_for(c, B, ctx, cfg)
                t0 = time.time()
                try:
                    t, err = run_candidate(c, q, ref, kw)
                except Exception as e:  # noqa: BLE001  (a config that does not compile or run)
                    print(f"sweep {name:8s} B={B} ctx={ctx:6d} {cfg}: FAILED {type(e).__name__}: {e}"[:300],
                          flush=True)
                    continue
                row = dict(format=name, batch=B, context=ctx, us=t, floor_us=fl, over_floor=t / fl,
                           vs_sdpa=sdpa / t, rel_err=err, per_sm=cfg["per_sm"],
                           candidate=json.dumps(cfg, sort_keys=True), **kw)
                log.append(row)
                print(f"sweep {name:8s} B={B} ctx={ctx:6d} bn={kw['block_n']:3d} w={kw['num_warps']} "
                      f"st={kw['num_stages']} splits={kw['num_splits']:3d} fused={kw['fused_reduce']:d} "
                      f"-> {t:8.1f} us {t / fl:5.2f}x floor "
                      f"{sdpa / t:5.2f}x sdpa  err {err:.1e}{'' if err < ERR_TOL else '  BAD'}  "
                      f"({time.time() - t0:.1f}s)", flush=True)
            del c, ref
            torch.cuda.empty_cache()
        del k, v, q
        torch.cuda.empty_cache()
    best = {}
    for name in names:
        scores: dict[tuple, float] = {}
        for r in log:
            if r["format"] != name or r["rel_err"] >= ERR_TOL:
                continue
            scores[r["candidate"]] = scores.get(r["candidate"], 0.0) + r["over_floor"]
        if scores:
            best[name] = json.loads(min(scores, key=scores.get))
    return best, log


def render_sweep(meta: dict, log: list[dict], best: dict) -> str:
    lines = [f"# Decode attention sweep on {meta['device']}", "",
             f"{meta['date']}, torch {meta['torch']}, triton {meta['triton']}, copy bandwidth "
             f"{meta['copy_bw_TBps']:.2f} TB/s. Best configuration per format and shape (× floor; "
             "error vs float32 reference on the same dequantized cache):", "",
             "| format | batch | context | µs | × floor | × SDPA | block_n | warps | stages | splits | merge | rel err |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for name in FORMATS:
        for B, ctx in dict.fromkeys((r["batch"], r["context"]) for r in log):
            rows = [r for r in log if r["format"] == name and r["batch"] == B and r["context"] == ctx
                    and r["rel_err"] < ERR_TOL]
            if not rows:
                continue
            r = min(rows, key=lambda r: r["us"])
            lines.append(f"| {name} | {B} | {ctx} | {r['us']:.1f} | {r['over_floor']:.2f} | {r['vs_sdpa']:.2f} | "
                         f"{r['block_n']} | {r['num_warps']} | {r['num_stages']} | {r['num_splits']} | "
                         f"{'fused' if r['fused_reduce'] else 'kernel'} | {r['rel_err']:.1e} |")
    bad = [r for r in log if r["rel_err"] >= ERR_TOL]
    lines += ["", f"Chosen (summed over shapes): `{json.dumps(best)}`",
              f"Candidates timed: {len(log)}; over the error bound: {len(bad)}.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- full grid
def full_grid(bw: float, gen: torch.Generator, best: dict) -> list[dict]:
    rows = []
    for B, ctx in GRID:
        k, v, q = tensors(B, ctx, gen)
        sdpa = time_sdpa(q[:, :, None], k, v)
        row = dict(batch=B, context=ctx, sdpa_bf16_us=sdpa)
        for name, spec in FORMATS.items():
            c = build(spec, B, ctx, k, v)
            ref = reference(c, q)
            kw = kwargs_for(c, B, ctx, best[name])
            t, err = run_candidate(c, q, ref, kw)
            fl = floor_us(spec, B, ctx, bw)
            row[name] = dict(us=t, floor_us=fl, over_floor=t / fl, vs_sdpa=sdpa / t, rel_err=err, **kw)
            del c, ref
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"B={B:3d} ctx={ctx:6d} sdpa {sdpa:7.1f} | " + " | ".join(
            f"{n} {row[n]['us']:.1f} ({row[n]['over_floor']:.2f}x)" for n in FORMATS), flush=True)
        del k, v, q
        torch.cuda.empty_cache()
    return rows


def render(meta: dict, rows: list[dict]) -> str:
    names = list(FORMATS)
    lines = [
        f"# Decode attention over a compressed KV cache on {meta['device']}",
        "",
        f"Measured by `benchmarks/attention.py` on {meta['date']}: torch {meta['torch']}, "
        f"triton {meta['triton']}. Copy bandwidth {meta['copy_bw_TBps']:.2f} TB/s (read + write).",
        "One query token, Hq=32, Hkv=8, head dim 128, every row at full context; times in µs, "
        "medians of CUDA-graph replays. A format's floor is its cache bytes (codes, scales, "
        "residual) read once at the copy bandwidth. int4/int2: keys per channel in groups of 64 "
        "tokens (bf16 residual of 64), values per token.",
        "",
        "| batch | context | SDPA bf16 | " + " | ".join(f"{n} (× floor)" for n in names)
        + " | SDPA ÷ int4 |",
        "|---:|---:|---:|" + "---:|" * len(names) + "---:|",
    ]
    for r in rows:
        cells = " | ".join(f"{r[n]['us']:.1f} ({r[n]['over_floor']:.2f}×)" for n in names)
        lines.append(f"| {r['batch']} | {r['context']} | {r['sdpa_bf16_us']:.1f} | {cells} | "
                     f"{r['int4']['vs_sdpa']:.2f}× |")
    worst = max(r[n]["rel_err"] for r in rows for n in names)
    lines += ["", "Floors (µs): " + "; ".join(
        f"({r['batch']}, {r['context']}): " + ", ".join(f"{n} {r[n]['floor_us']:.1f}" for n in names
                                                         if n != "int4-rot") for r in rows), "",
              f"Every timed output was NaN-poisoned first and checked against a float32 reference on "
              f"the same dequantized cache: largest relative error {worst:.1e}.", "",
              "Targets (batch ≥ 8, context ≥ 8192): "
              + ", ".join(f"{n} ≤ {t}× floor" for n, t in TARGET.items())
              + "; int4 ≥ 2.8× faster than SDPA bf16 at (8, 32768).", ""]
    for r in rows:
        if r["batch"] >= 8 and r["context"] >= 8192:
            verdict = ", ".join(f"{n} {r[n]['over_floor']:.2f}× {'met' if r[n]['over_floor'] <= t else 'MISSED'}"
                                for n, t in TARGET.items())
            lines.append(f"- ({r['batch']}, {r['context']}): {verdict}; SDPA ÷ int4 "
                         f"{r['int4']['vs_sdpa']:.2f}×")
    lines += ["", "Launch configurations (block_n, warps, stages, splits; `null` config: the library's "
              f"own `launch_config`): `{json.dumps(meta['configs'])}`", ""]
    for r in rows:
        lines.append(f"- ({r['batch']}, {r['context']}): " + "; ".join(
            f"{n} {r[n]['block_n']}/{r[n]['num_warps']}/{r[n]['num_stages']}/{r[n]['num_splits']}"
            for n in names))
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- static (SASS)
def _sass_signature(fn, fmt: str, constexprs: dict) -> dict:
    """Argument types of ``fn``'s runtime parameters (those not given as ``constexprs``) for a
    cache in ``fmt``, in ``fn``'s own parameter order."""
    cd = {"bf16": "*bf16", "fp8_e4m3": "*u8", "int8": "*i8", "int4": "*u8", "int2": "*u8"}[fmt]
    sc = "*fp16" if fmt in ("int4", "int2") else "*fp32"
    types = dict(Q="*bf16", Had="*bf16", Opart="*fp32", Lpart="*fp32", Out="*bf16", Tickets="*i32",
                 Lengths="*i32", K=cd, Ks=sc, Km="*fp16", V=cd, Vs=sc, Vm="*fp16", Kres="*bf16",
                 Vres="*bf16", sm_scale_log2="fp32", log2_theta="fp32", HKV="i32", S="i32", NG="i32",
                 NUM_SPLITS="i32", NS_TOTAL="i32", CHUNK="i32", T="i32")
    return {p.name: types[p.name] for p in fn.params if not p.is_constexpr and p.name not in constexprs}


def _revision_package(rev: str) -> dict:
    """The decode attention modules of git revision ``rev`` (``decode``, and ``launch`` where it
    exists), imported from that revision's own ``qcompile/`` (extracted to a temporary directory;
    its ``__init__`` is not run) and kept apart from this checkout's modules."""
    import importlib
    import subprocess
    import tempfile
    import types
    dest = tempfile.mkdtemp()
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "qcompile"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
    ours = {k: m for k, m in sys.modules.items() if k == "qcompile" or k.startswith("qcompile.")}
    for k in ours:
        del sys.modules[k]
    pkg = types.ModuleType("qcompile")
    pkg.__path__ = [os.path.join(dest, "qcompile")]
    sys.modules["qcompile"] = pkg
    try:
        mods = {"decode": importlib.import_module("qcompile.codegen.attention.decode")}
        try:
            mods["launch"] = importlib.import_module("qcompile.codegen.attention.launch")
        except ImportError:
            mods["launch"] = mods["decode"]
    finally:
        for k in [k for k in sys.modules if k == "qcompile" or k.startswith("qcompile.")]:
            del sys.modules[k]
        sys.modules.update(ours)
    return mods


def sass_table(ref: str | None) -> list[dict]:
    """Compile each format's kernel for sm_90 (1 query token, GQA 4, D 128, group 64) and count."""
    from aot_sass import compile_for, sass, sass_stats

    from qcompile.codegen.attention import decode as dec
    kernels = [("new", dec, False)]
    if ref:
        old = _revision_package(ref)["decode"]
        # a revision with today's kernel compiles like it; older ones are the pre-rewrite kernel
        kernels.append((f"{ref}", old, not hasattr(old, "_decode_kernel")))
    rows = []
    for label, mod, legacy in kernels:
        for name, spec in FORMATS.items():
            rot = name.endswith("-rot")
            code, grouped = KV_CODES[spec.key_format], spec.grouped_keys
            if legacy:
                if rot:
                    continue   # the old kernel rotated q with torch before the launch: same kernel
                cfg = dict(block_n=32 if spec.key_format == "bf16" else 64, num_warps=4, num_stages=3 if spec.key_format == "bf16" else 2)
                cons = dict(T=1, GQA=4, D=D, BLOCK_M=16, BLOCK_N=cfg["block_n"], K_FMT=code, V_FMT=code,
                            GROUP=64, VGROUP=D, R=64 if grouped else 1, PRE_ROPE=False, FOLD=grouped,
                            FP8_NATIVE=True, INTERP=False, ITERS=0, GATHER=False)
                fn = mod._decode_split_kernel
            else:
                c = launch_config(spec, D, 8, HKV, 32768, 132)
                cfg = dict(block_n=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages)
                kf, vf = kernel_paths(spec, D, cfg["block_n"])
                cons = dict(T=1, GQA=4, D=D, BLOCK_M=16, BLOCK_N=cfg["block_n"], K_FMT=code, V_FMT=code,
                            GROUP=64, VGROUP=D, R=64 if grouped else 1, TB=16, PRE_ROPE=False,
                            ROTATE=rot, KFAST=kf, VFAST=vf, FUSED=True, LAZY=True, ASM=True,
                            INTERP=False, ITERS=0, RES_ITERS=0)
                fn = mod._decode_kernel
            params = {p.name for p in fn.params}
            cons = {k: v for k, v in cons.items() if k in params}   # what this revision's kernel takes
            sig = _sass_signature(fn, spec.key_format, cons)
            aligned = tuple(n for n, t in sig.items() if t.startswith("*")) + ("S", "CHUNK", "NG")
            k = compile_for(fn, sig, cons, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                            aligned=aligned)
            text = sass(k)
            st = sass_stats(k, text)
            loop = _main_loop(text, legacy)
            elems = cfg["block_n"] * 2 * D                    # keys + values per iteration
            threads = 32 * cfg["num_warps"]
            row = dict(kernel=label, format=name, regs=st["regs"], stack=st["stack"], smem=st["shared"],
                       **cfg, loop_instr=loop["n"], per_elem=loop["n"] * threads / elems,
                       per_elem_no_rescale=(loop["n"] - loop["skip"]) * threads / elems,
                       **{f"loop_{op}": loop["ops"].get(op, 0) * threads / elems
                          for op in ("I2F", "F2F", "F2FP", "LDS", "STS", "LDSM", "HMMA", "SHFL", "BAR")})
            rows.append(row)
            print(f"sass {label:8s} {name:8s} regs {row['regs']:3d} stack {row['stack']:4d} smem {row['smem']:6d} "
                  f"loop {row['loop_instr']:5d} instr = {row['per_elem']:.2f}/elem "
                  f"({row['per_elem_no_rescale']:.2f} w/o rescale) | per elem: I2F {row['loop_I2F']:.2f} "
                  f"F2F(P) {row['loop_F2F'] + row['loop_F2FP']:.2f} LDS {row['loop_LDS'] + row['loop_LDSM']:.2f} "
                  f"STS {row['loop_STS']:.2f} HMMA {row['loop_HMMA']:.3f} BAR {row['loop_BAR']:.3f}",
                  flush=True)
    return rows


def _main_loop(text: str, legacy: bool) -> dict:
    """Instructions of the main loop (a backward branch's body with the most HMMA: the first such
    loop in the new kernel, the last in the legacy one whose residual loop comes first) and of
    the largest region a forward branch skips inside it (the lazy rescale)."""
    import collections
    ins = []
    for line in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*)", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
    addrs = [a for a, _ in ins]
    loops = []
    for i, (a, t) in enumerate(ins):
        m = re.search(r"BRA[^;]*?0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in addrs:
            lo = addrs.index(int(m.group(1), 16))
            ops = collections.Counter()
            for _, tt in ins[lo:i + 1]:
                mm = re.match(r"(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", tt)
                if mm:
                    ops[mm.group(1)] += 1
            loops.append((lo, i, ops))
    most = max(lp[2]["HMMA"] for lp in loops)
    lo, hi, ops = [lp for lp in loops if lp[2]["HMMA"] == most][-1 if legacy else 0]
    skip = 0
    for i in range(lo, hi):
        m = re.search(r"@!?P\d\s+BRA[^;]*?0x([0-9a-f]+)", ins[i][1])
        if m and ins[i][0] < int(m.group(1), 16) <= ins[hi][0]:
            skip = max(skip, addrs.index(int(m.group(1), 16)) - i - 1)
    return dict(n=hi - lo + 1, skip=skip, ops=ops)


def render_sass(rows: list[dict]) -> str:
    lines = ["| kernel | format | block_n / warps / stages | main loop instr / element (w/o rescale) | "
             "I2F+F2F(P) / elem | LDS+LDSM / elem | STS / elem | BAR / elem | regs | spill bytes |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['format']} | {r['block_n']} / {r['num_warps']} / {r['num_stages']} | "
                     f"{r['per_elem']:.2f} ({r['per_elem_no_rescale']:.2f}) | "
                     f"{r['loop_I2F'] + r['loop_F2F'] + r['loop_F2FP']:.2f} | {r['loop_LDS'] + r['loop_LDSM']:.3f} | "
                     f"{r['loop_STS']:.3f} | {r['loop_BAR']:.3f} | {r['regs']} | {r['stack']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def write_outputs(out_dir: str | None, files: dict[str, str]) -> None:
    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(text)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default=os.environ.get("OUT"))
    ap.add_argument("--quick", action="store_true", help="full grid with the default configs, no sweep")
    ap.add_argument("--sweep-only", action="store_true", help="only the launch-config sweep")
    ap.add_argument("--merge", action="store_true",
                    help="sweep the split merge (fused or not) and programs per SM over the whole grid")
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset (sweep)")
    ap.add_argument("--compile-workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="processes that pre-compile the sweep's kernels (1: compile inline)")
    ap.add_argument("--sass", action="store_true", help="no GPU: SASS statistics per format")
    ap.add_argument("--sass-ref", default=None, help="also the kernel of this git revision")
    args = ap.parse_args()

    if args.sass:
        rows = sass_table(args.sass_ref)
        md = render_sass(rows)
        write_outputs(args.out_dir, {"attention_sass.json": json.dumps(rows, indent=1),
                                     "attention_sass.md": md})
        print(md)
        return 0

    t_start = time.time()
    torch.manual_seed(0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev_name = torch.cuda.get_device_name(0)
    bw = copy_bandwidth()
    print(f"{dev_name}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    meta = dict(device=dev_name, torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                copy_bw_TBps=bw / 1e12)
    names = [n for n in args.formats.split(",") if n]
    cands, shapes = (merge_candidates, GRID) if args.merge else (candidates, SWEEP_SHAPES)
    args.sweep_only = args.sweep_only or args.merge
    default: dict = {n: None for n in FORMATS}   # None: decode_attention's own launch_config
    if (args.sweep_only or not args.quick) and args.compile_workers > 1:
        try:
            precompile(names, args.compile_workers, cands)
        except Exception as e:  # noqa: BLE001  (then the sweep compiles inline, slower)
            print(f"precompile failed ({type(e).__name__}: {e}); compiling inline", flush=True)
    if args.sweep_only or not args.quick:
        best, log = sweep(bw, gen, names, cands, shapes)
        md = render_sweep(meta, log, best)
        write_outputs(args.out_dir, {"attention_sweep.json": json.dumps(dict(meta=meta, best=best, log=log), indent=1),
                                     "attention_sweep.md": md})
        if args.sweep_only:
            print(md)
            print(f"total {time.time() - t_start:.0f}s")
            bad = [r for r in log if r["rel_err"] >= ERR_TOL]
            return 1 if bad else 0
        default.update(best)
    meta["configs"] = default
    rows = full_grid(bw, gen, default)
    md = render(meta, rows)
    slug = re.sub(r"[^a-z0-9]+", "-", dev_name.lower().replace("nvidia", "")).strip("-")
    path = os.path.join(ROOT, "docs", "benchmarks", f"attention-{slug}.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(md)
    write_outputs(args.out_dir, {f"attention-{slug}.md": md,
                                 "attention_bench.json": json.dumps(dict(meta=meta, rows=rows), indent=1)})
    print(md)
    print(f"total {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
