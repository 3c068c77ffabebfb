"""Do two source trees generate the same GPU code? Compiles the same real launches of the GEMM
kernels (int_mma, weight_only, fp8, w4a8, w4a4, split-K epilogue) and of the KV-cache kernels
(quantize-on-append, decode attention and its split merge) for sm_90 from each tree, on any
machine (no GPU: launches are captured, not run), and compares the PTX instruction streams.

    python benchmarks/compare_ptx.py --base HEAD              # the working tree against HEAD
    python benchmarks/compare_ptx.py --base /tmp/old --new /tmp/new --only decode
    python benchmarks/compare_ptx.py --base HEAD~1 --keep /tmp/ptx --diff 20

``--base`` / ``--new``: a directory holding ``qcompile/`` or a git revision of this repository
(default ``--new``: this checkout's working tree). Each tree runs in its own process with only
its ``qcompile`` on the path (the package's ``__init__`` is not run, so a tree whose API layer is
mid-edit still compiles its kernels). The launches are made through the public host wrappers
(``triton_quantized_linear``, ``QuantizedKVCache.append``, ``decode_attention``) on CPU tensors
with ``TRITON_INTERPRET`` unset; decode attention's interpreter-only constexprs are set to their
GPU values (``INTERP=False, ASM=True, LAZY=True, ITERS=RES_ITERS=0``) and its launch parameters
are the GPU defaults of ``launch_config``. Triton's own argument binder decides specializations
(``aot_sass.compile_launch``), as on a GPU.

Before comparing, the PTX loses what is not code: ``.loc`` / ``.file`` lines, comments, the
DWARF sections, debug labels, the kernel's name, and parameter indices (a parameter is named by
its kernel argument, so reordering a kernel's arguments alone is no difference). Exit status 1
if any launch differs or fails in one tree only.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

DEBUG_LABEL = re.compile(r"\$L__(tmp|func_begin|func_end)\d+:")
# interpreter-only constexprs of the decode kernel, at their GPU values
GPU_CONSTEXPRS = {"INTERP": False, "ASM": True, "LAZY": True, "ITERS": 0, "RES_ITERS": 0}


# ----------------------------------------------------------------------------- PTX normalization
def normalize_ptx(ptx: str, kernel_name: str, param_names: list[str]) -> str:
    """The instruction stream of ``ptx`` without debug information, comments and names."""
    out = []
    body = ptx.split("\t.section\t.debug", 1)[0]
    for line in body.splitlines():
        s = line.split("//", 1)[0].rstrip()
        t = s.strip()
        if not t or t.startswith((".loc", ".file")) or DEBUG_LABEL.fullmatch(t):
            continue

        def param(m: re.Match) -> str:
            i = int(m.group(1))
            name = param_names[i] if i < len(param_names) else f"extra{i - len(param_names)}"
            return f"%param<{name}>"

        s = re.sub(re.escape(kernel_name) + r"_param_(\d+)", param, s)
        s = re.sub(r"(\.entry|\.globl)\s+" + re.escape(kernel_name) + r"\b", r"\1 KERNEL", s)
        out.append(s)
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- launches (worker side)
def _gemm_launches():
    """(label, call) pairs through ``triton_quantized_linear``."""
    import torch

    from qcompile.codegen.gemm import force_triton, triton_quantized_linear
    from qcompile.codegen.gemm.reference import random_quantized
    from qcompile.formats.spec import QuantSpec

    fp8_act = QuantSpec("fp8_e4m3", dynamic=True)
    cases = [
        # label, weight spec, act spec, M, N, K, x dtype, epilogue extras
        ("int_mma/int4-g128/M1", QuantSpec("int4", 128), None, 1, 4096, 4096, torch.bfloat16, {}),
        ("int_mma/int4-g128-asym/M16/fp16", QuantSpec("int4", 128, symmetric=False), None, 16, 4096, 4096,
         torch.float16, {}),
        ("int_mma/int8-pc/M32", QuantSpec("int8"), None, 32, 4096, 4096, torch.bfloat16, {}),
        ("int_mma/int8-g128-asym/M8/fp16", QuantSpec("int8", 128, symmetric=False), None, 8, 2048, 4096,
         torch.float16, {}),
        ("int_mma/int4-pc/M128", QuantSpec("int4"), None, 128, 4096, 4096, torch.bfloat16, {}),
        ("int_mma/int4-g128/M16/silu+bias+res", QuantSpec("int4", 128), None, 16, 8192, 4096, torch.bfloat16,
         dict(bias=True, residual=True, epilogue="silu_mul")),
        ("weight_only/int4-g32/M1", QuantSpec("int4", 32), None, 1, 4096, 4096, torch.bfloat16, {}),
        ("weight_only/int4-g32-asym/M64/silu+res", QuantSpec("int4", 32, symmetric=False), None, 64, 4096, 4096,
         torch.bfloat16, dict(residual=True, epilogue="silu_mul")),
        ("weight_only/int8-g32/M100", QuantSpec("int8", 32), None, 100, 4096, 4096, torch.bfloat16, {}),
        ("weight_only/fp8/M16", QuantSpec("fp8_e4m3"), None, 16, 4096, 4096, torch.bfloat16, {}),
        ("weight_only/nvfp4/M16", QuantSpec("nvfp4"), None, 16, 4096, 4096, torch.bfloat16, {}),
        ("weight_only/mxfp4/M1/bias", QuantSpec("mxfp4"), None, 1, 4096, 4096, torch.bfloat16, dict(bias=True)),
        ("weight_only/mxfp8/M32", QuantSpec("mxfp8"), None, 32, 4096, 4096, torch.bfloat16, {}),
        ("weight_only/fp4-g32/M16/fp16", QuantSpec("fp4_e2m1", 32), None, 16, 4096, 4096, torch.float16, {}),
        ("weight_only/int4-g128/M256(dequant)", QuantSpec("int4", 128), None, 256, 4096, 4096, torch.bfloat16, {}),
        ("fp8/M16", QuantSpec("fp8_e4m3"), fp8_act, 16, 4096, 4096, torch.bfloat16, {}),
        ("fp8/M300/bias+res", QuantSpec("fp8_e4m3"), fp8_act, 300, 4096, 4096, torch.bfloat16,
         dict(bias=True, residual=True)),
        ("w4a8/int4-g128/M1", QuantSpec("int4", 128), fp8_act, 1, 4096, 4096, torch.bfloat16, {}),
        ("w4a8/int4-g128-asym/M64/silu", QuantSpec("int4", 128, symmetric=False), fp8_act, 64, 4096, 4096,
         torch.bfloat16, dict(epilogue="silu_mul")),
        ("w4a4/nvfp4/M16", QuantSpec("nvfp4"), QuantSpec("nvfp4", dynamic=True), 16, 4096, 4096, torch.bfloat16,
         {}),
        ("w4a4/mxfp4/M64/res", QuantSpec("mxfp4"), QuantSpec("mxfp4", dynamic=True), 64, 4096, 4096,
         torch.bfloat16, dict(residual=True)),
    ]
    out = []
    for label, wspec, aspec, M, N, K, dt, extra in cases:
        def call(wspec=wspec, aspec=aspec, M=M, N=N, K=K, dt=dt, extra=extra):
            gen = torch.Generator().manual_seed(0)
            qt = random_quantized(wspec, N, K, generator=gen)
            x = torch.randn(M, K, generator=gen).to(dt)
            n_out = N // 2 if extra.get("epilogue") == "silu_mul" else N
            bias = torch.randn(N, generator=gen).to(dt) if extra.get("bias") else None
            res = torch.randn(M, n_out, generator=gen).to(dt) if extra.get("residual") else None
            with force_triton():
                triton_quantized_linear(x, qt, bias, aspec, res, extra.get("epilogue", "none"))
        out.append((label, call, {}))
    # MXFP4 through tl.dot_scaled (the GPU path; the CPU capture takes the explicit one)
    out.append(("w4a4/mxfp4/M64/dot_scaled", out[-1][1], {"USE_DOT_SCALED": True}))
    return out


def _launch_defaults(spec, D: int) -> dict:
    """``launch_config``'s GPU choice (batch 8, 8 KV heads, 32768 tokens, 132 SMs), either API."""
    try:
        from qcompile.codegen.attention.launch import launch_config
    except ImportError:   # a tree before the split of decode.py
        from qcompile.codegen.attention.decode import launch_config
    cfg = launch_config(spec, D, 8, 8, 32768, 132)
    get = cfg.__getitem__ if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
    return {k: get(k) for k in ("block_n", "num_warps", "num_stages")}


def _kv_launches():
    """(label, call) pairs: appends to, then decode attention over, a cache per spec."""
    import torch

    from qcompile.codegen.attention import decode_attention
    from qcompile.runtime import KVCacheSpec, QuantizedKVCache

    S = lambda f, **kw: KVCacheSpec(f, **kw)  # noqa: E731
    specs = [
        ("bf16", S("bf16"), 128), ("fp8", S("fp8_e4m3"), 128), ("int8", S("int8"), 128),
        ("int4", S("int4"), 128), ("int4-rot", S("int4", rotate_keys=True), 128), ("int2", S("int2"), 128),
        ("int2-rot-g32", S("int2", group_size=32, rotate_keys=True), 128),
        ("int4-prerope", S("int4", pre_rope=True), 128), ("int4-vg32", S("int4", value_group_size=32), 128),
        ("kint4-vbf16", S("int4", value_format="bf16"), 128), ("kbf16-vint4", S("bf16", value_format="int4"), 128),
        ("kint8-vint4-rot", S("int8", value_format="int4", rotate_keys=True), 128),
        ("kfp8-vbf16", S("fp8_e4m3", value_format="bf16"), 128), ("int4-g128", S("int4", group_size=128), 128),
        ("int2/D64", S("int2", group_size=32), 64), ("int8-rot/D64", S("int8", rotate_keys=True), 64),
    ]
    B, Hkv, Hq, MAXLEN = 2, 2, 8, 2048
    out = []
    for name, spec, D in specs:
        def cache(spec=spec, D=D):
            return QuantizedKVCache(1, B, MAXLEN, Hkv, D, spec, impl="triton")

        def append(spec=spec, D=D, cache=cache):
            c = cache()
            k = torch.randn(B, Hkv, 40, D).bfloat16()
            c.append(0, k, k.clone(), [40, 33])
        out.append((f"append/{name}", append, {}))
        variants = [("T1", 1, {})]
        if name in ("int4", "int2", "fp8"):
            variants += [("T4-merge-kernel", 4, dict(fused_reduce=False)), ("T1-generic", 1, dict(unpack="generic"))]
        for vname, T, extra in variants:
            def decode(spec=spec, D=D, T=T, extra=extra, cache=cache):
                c = cache()
                c._len_bound[0] = 1500      # as after appends (captured appends write nothing)
                c.lengths[0] = torch.tensor([1500, 1200], dtype=torch.int32)
                q = torch.randn(B, Hq, T, D).bfloat16()
                kw = dict(_launch_defaults(spec, D), num_splits=4, **extra)
                if "unpack" in extra:
                    kw.update(num_warps=4, num_stages=2)
                decode_attention(q, c, 0, impl="triton", **kw)
            out.append((f"decode/{name}/{vname}", decode, dict(GPU_CONSTEXPRS)))
    return out


def worker(tree: str, out_path: str, only: str | None, cc: int) -> None:
    """Compile every launch with ``tree``'s ``qcompile`` and write the normalized PTX as JSON."""
    import types

    pkg = types.ModuleType("qcompile")           # the package without its __init__ (API layer)
    pkg.__path__ = [os.path.join(tree, "qcompile")]
    sys.modules["qcompile"] = pkg
    sys.path.insert(0, HERE)
    from aot_sass import capture_launches, compile_launch

    import qcompile.codegen.gemm as gemm
    if not os.path.abspath(gemm.__file__).startswith(os.path.abspath(tree)):
        raise RuntimeError(f"imported {gemm.__file__}, not from {tree}")
    launches = _gemm_launches() + _kv_launches()
    if only:
        keys = only.split(",")
        launches = [lc for lc in launches if any(k in lc[0] for k in keys)]
    results: dict[str, dict] = {}
    for label, call, overrides in launches:
        t0 = time.time()
        try:
            captured = capture_launches(call)
        except Exception as e:  # noqa: BLE001  (reported per launch)
            results[label] = {"error": f"capture: {type(e).__name__}: {e}"[:400]}
            continue
        for i, (kernel, args, opts) in enumerate(captured):
            key = f"{label} #{i} {kernel.fn.__name__}"
            args = dict(args)
            args.update({k: v for k, v in overrides.items() if k in args})
            try:
                compiled, names = compile_launch(kernel, args, opts, cc=cc)
                results[key] = {"ptx": normalize_ptx(compiled.asm["ptx"], compiled.metadata.name, names),
                                "shared": compiled.metadata.shared}
            except Exception as e:  # noqa: BLE001
                msg = f"{type(e).__name__}: {e}"
                results[key] = {"error": msg if len(msg) < 600 else msg[:200] + " ... " + msg[-400:]}
        print(f"[{os.path.basename(tree.rstrip('/'))}] {label}: {len(captured)} launch(es), "
              f"{time.time() - t0:.1f}s", flush=True)
    with open(out_path, "w") as f:
        json.dump(results, f)


# ----------------------------------------------------------------------------- driver
def materialize(ref: str, tmp: str) -> str:
    """A directory holding ``qcompile/`` for ``ref`` (a directory, or a git revision)."""
    if os.path.isdir(os.path.join(ref, "qcompile")):
        return os.path.abspath(ref)
    dest = tempfile.mkdtemp(prefix="ptx-", dir=tmp)
    archive = subprocess.run(["git", "-C", ROOT, "archive", ref, "qcompile"], capture_output=True,
                             check=True)
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
    return dest


def run_tree(tree: str, out_path: str, only: str | None, cc: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # Triton 3.9's default, without its warning
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", tree, "--worker-out", out_path,
           "--cc", str(cc)]
    if only:
        cmd += ["--only", only]
    return subprocess.Popen(cmd, env=env, cwd=tempfile.gettempdir())


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def compare(base: dict, new: dict, show: int) -> tuple[list[str], dict[str, int]]:
    """One line per launch (``identical``, ``DIFFERS`` with a diff, ``FAILS`` in one tree, ``both
    fail``, ``ONLY IN`` one tree) and the count of each."""
    lines, counts = [], dict.fromkeys(("identical", "differing", "failing", "both fail"), 0)
    for key in sorted(set(base) | set(new)):
        a, b = base.get(key), new.get(key)
        if a is None or b is None:
            counts["differing"] += 1
            lines.append(f"ONLY IN {'NEW' if a is None else 'BASE'}  {key}")
        elif "error" in a and "error" in b:
            counts["both fail"] += 1
            lines.append(f"both fail  {key}: {b['error']}")
        elif "error" in a or "error" in b:
            counts["failing"] += 1
            lines.append(f"FAILS      {key} ({'base' if 'error' in a else 'new'}): {a.get('error') or b.get('error')}")
        elif a["ptx"] == b["ptx"] and a["shared"] == b["shared"]:
            counts["identical"] += 1
            lines.append(f"identical  {key}")
        else:
            counts["differing"] += 1
            lines.append(f"DIFFERS    {key}  (shared {a['shared']} -> {b['shared']})")
            diff = difflib.unified_diff(a["ptx"].splitlines(), b["ptx"].splitlines(), "base", "new",
                                        n=1, lineterm="")
            lines += ["    " + d for d in list(diff)[:show]]
    return lines, counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="HEAD", help="directory with qcompile/, or a git revision")
    ap.add_argument("--new", default=ROOT, help="directory with qcompile/, or a git revision")
    ap.add_argument("--only", default=None, help="comma-separated substrings of launch labels")
    ap.add_argument("--cc", type=int, default=90)
    ap.add_argument("--diff", type=int, default=12, help="diff lines shown per differing kernel")
    ap.add_argument("--keep", default=None, help="write each tree's normalized PTX (JSON) here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.worker_out, args.only, args.cc)
        return 0
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        trees = [materialize(args.base, tmp), materialize(args.new, tmp)]
        outs = [os.path.join(args.keep or tmp, f"ptx_{n}.json") for n in ("base", "new")]
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
        procs = [run_tree(t, o, args.only, args.cc) for t, o in zip(trees, outs)]
        if any(p.wait() for p in procs):
            print("a worker failed", file=sys.stderr)
            return 2
        base, new = (_load(o) for o in outs)
    lines, counts = compare(base, new, args.diff)
    print("\n".join(lines))
    print(f"\n{sum(counts.values())} kernel launches compared for sm_{args.cc} ({args.base} vs {args.new}): "
          + ", ".join(f"{v} {k}" for k, v in counts.items()) + f" ({time.time() - t0:.0f}s)")
    return 1 if counts["differing"] or counts["failing"] else 0

if __name__ == "__main__":
    sys.exit(main())
