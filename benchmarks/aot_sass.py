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
