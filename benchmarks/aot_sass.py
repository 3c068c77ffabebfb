"""Compile a Triton kernel ahead of time for a GPU this machine does not have, and count
what matters in its SASS: no GPU needed, so kernel work can be checked before spending
device time (registers, spills, shared memory, the instructions the inner loop uses).

    from benchmarks.aot_sass import compile_for, sass_stats
    k = compile_for(kernel, {"x_ptr": "*bf16", "N": "i32"}, {"BLOCK": 64}, cc=90, num_warps=4)
    print(sass_stats(k))

Pointer and integer arguments named in ``aligned`` are compiled as 16-divisible (what
Triton's launcher specialises on for real tensors and sizes).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

WATCH = ("I2F", "F2F", "F2I", "I2FP", "F2FP", "HMMA", "HGMMA", "QGMMA", "IMMA", "FFMA", "FMUL", "FADD", "HFMA2",
         "HADD2", "HMUL2", "LOP3", "SHF", "PRMT", "IMAD", "LDG", "LDS", "STS", "LDSM", "STG", "BAR", "MUFU",
         "SHFL", "LDL", "STL", "RED", "ATOM", "UTMALDG", "LDGSTS")


def compile_for(fn, signature: dict[str, str], constexprs: dict, cc: int = 90, num_warps: int = 4,
                num_stages: int = 3, aligned: tuple[str, ...] | None = None):
    """``triton.compile`` for ``cuda:sm_<cc>`` on any machine."""
    names = list(signature)
    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    if aligned is None:
        aligned = tuple(n for n, t in signature.items() if t.startswith("*"))
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned if n in names}
    src = ASTSource(fn, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _cuobjdump(kernel, flag: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        path = f.name
    try:
        return subprocess.run([tool, flag, path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)


def sass(kernel) -> str:
    """Disassembly of the compiled cubin (Triton ships cuobjdump)."""
    return _cuobjdump(kernel, "-sass")


def sass_stats(kernel, text: str | None = None) -> dict:
    """Registers, spills, shared memory, and counts of the watched opcodes (whole kernel)."""
    text = text if text is not None else sass(kernel)
    ops = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?", line)
        if m:
            op = m.group(1)
            full = op + (m.group(2) or "")
            for w in WATCH:
                if op == w:
                    ops[w] += 1
            if op in ("LDG", "LDS", "STS", "STG"):
                ops[full] += 1
    usage = _cuobjdump(kernel, "-res-usage")
    reg = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return {"regs": int(reg.group(1)) if reg else None, "stack": int(stack.group(1)) if stack else None,
            "shared": kernel.metadata.shared, "ops": dict(sorted(ops.items()))}


_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64", "int32": "i32",
          "int64": "i64", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1", "float8_e4m3fn": "fp8e4nv",
          "float8_e5m2": "fp8e5"}


def capture_launches(fn_call, *args, **kwargs) -> list[tuple]:
    """Run ``fn_call(*args, **kwargs)`` with every Triton launch intercepted (nothing runs; outputs
    stay unwritten) and return ``(kernel, bound_args, options)`` per launch, so that the kernels
    can be compiled for a GPU with the argument types a real call would give them."""
    import inspect

    from triton.runtime.jit import JITFunction

    calls = []
    original = JITFunction.run

    def record(self, *a, grid, warmup, **kw):
        names = inspect.signature(self.fn).parameters
        opts = {k: kw.pop(k) for k in list(kw) if k not in names}   # num_warps, maxnreg, ...
        bound = inspect.signature(self.fn).bind(*a, **kw)
        calls.append((self, dict(bound.arguments), opts))

    JITFunction.run = record
    try:
        fn_call(*args, **kwargs)
    finally:
        JITFunction.run = original
    return calls


def compile_captured(kernel, arguments: dict, options: dict, cc: int = 90):
    """Compile one captured launch for ``sm_<cc>`` with its real argument types."""
    import torch

    sig, const = {}, {}
    for p in kernel.params:
        v = arguments[p.name]
        if p.is_constexpr:
            const[p.name] = v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _TYPES[str(v.dtype).replace("torch.", "")]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        elif v is None:
            const[p.name] = None
        else:
            raise TypeError(f"{p.name}: cannot type {type(v)}")
    return compile_for(kernel, sig, const, cc=cc, num_warps=options.get("num_warps", 4),
                       num_stages=options.get("num_stages", 3))


def compile_launch(kernel, arguments: dict, options: dict, cc: int = 90):
    """Compile one captured launch for ``sm_<cc>`` exactly as a launch on that GPU would: Triton's
    own argument binder decides the specializations (16-divisible pointers and integers, integers
    equal to 1 folded, ``do_not_specialize`` honoured), so the PTX is the PTX a GPU run gets.
    Returns ``(compiled kernel, names of the PTX parameters in order)``."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**arguments, **options, "debug": False}
    bound, specialization, _ = binder(**kwargs)
    opts, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, None)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=opts.__dict__)
    return compiled, [n for n, t in signature.items() if t != "constexpr"]
