"""The inline PTX of ``int_mma`` (int4 / int8 -> bf16 / fp16 bit tricks), run on CPU by a small
emulator of the instructions it uses. The interpreter tests cannot run inline assembly, so this is
where its bit logic is checked before a GPU ever sees it: every code, every zero point, both
output orders."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from qcompile.codegen.gemm import int_mma


def _f16x2(bits: int, dtype: torch.dtype) -> np.ndarray:
    h = np.array([bits & 0xFFFF, bits >> 16], dtype=np.uint16)
    return torch.from_numpy(h.view(np.int16).copy()).view(dtype).float().numpy()


def _to_f16x2(vals: np.ndarray, dtype: torch.dtype) -> int:
    h = torch.tensor(vals, dtype=torch.float32).to(dtype).view(torch.int16).numpy().view(np.uint16)
    return int(h[0]) | (int(h[1]) << 16)


def _prmt(a: int, b: int, sel: int) -> int:
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        s = (sel >> (4 * i)) & 0xF
        assert s < 8, "sign-replicating selectors are not emulated"
        out |= src[s] << (8 * i)
    return out


def run_ptx(text: str, args: dict[int, int]) -> dict[int, int]:
    """Execute the straight-line PTX subset used by int_mma on 32-bit registers."""
    regs: dict[str, int] = {f"${k}": v & 0xFFFFFFFF for k, v in args.items()}

    def val(tok: str) -> int:
        tok = tok.strip()
        return regs[tok] if tok in regs else int(tok, 0) & 0xFFFFFFFF

    for raw in text.splitlines():
        line = raw.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *src = [t.strip() for t in rest.split(",")]
        if op == "mov.b32":
            regs[dst] = val(src[0])
        elif op == "shr.b32":
            regs[dst] = val(src[0]) >> val(src[1])
        elif op == "prmt.b32":
            regs[dst] = _prmt(val(src[0]), val(src[1]), val(src[2]))
        elif op == "lop3.b32":
            assert val(src[3]) == 0xEA, "only (a & b) | c is emulated"
            regs[dst] = (val(src[0]) & val(src[1])) | val(src[2])
        elif op in ("fma.rn.bf16x2", "fma.rn.f16x2"):
            dt = torch.bfloat16 if "bf16" in op else torch.float16
            a, b, c = (_f16x2(val(s), dt) for s in src)
            exact = a.astype(np.float64) * b + c
            regs[dst] = _to_f16x2(exact, dt)
        elif op == "sub.f32":
            a, b = (np.array([val(s)], dtype=np.uint32).view(np.float32)[0] for s in src)
            regs[dst] = int(np.array([a - b], dtype=np.float32).view(np.uint32)[0])
        else:
            raise AssertionError(f"unexpected PTX op {op}")
    return {int(k[1:]): v for k, v in regs.items() if re.fullmatch(r"\$\d+", k)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("zero", [None, 0, 3, 8, 15])
def test_int4_asm_codes_in_order(dtype, zero):
    """4 bytes (8 codes, low nibble first) -> (c0..c3), (c4..c7) as code - zero, exactly."""
    rng = np.random.default_rng(0)
    bf = dtype == torch.bfloat16
    if zero is None:
        asm = (int_mma.SYM4_TO_BF16 if bf else int_mma.SYM4_TO_F16).value
    else:
        asm = (int_mma.ASYM4_TO_BF16 if bf else int_mma.ASYM4_TO_F16).value
    for _ in range(50):
        codes = rng.integers(0, 16, 8)
        word = sum(int(codes[2 * i] | (codes[2 * i + 1] << 4)) << (8 * i) for i in range(4))
        args = {4: word}
        off = 8 if zero is None else zero
        if zero is not None:
            h = (0xC300 if bf else 0xE400) | zero
            args[5] = h | (h << 16)
        out = run_ptx(asm, args)
        got = np.concatenate([_f16x2(out[r], dtype) for r in range(4)])
        np.testing.assert_array_equal(got, codes - off)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("signed", [True, False])
def test_int8_asm_codes_in_order(dtype, signed):
    rng = np.random.default_rng(1)
    bf = dtype == torch.bfloat16
    asm = (int_mma.INT8_TO_BF16 if bf else int_mma.INT8_TO_F16).value
    for _ in range(50):
        if signed:
            q = rng.integers(-128, 128, 4)
            u = q + 128  # the kernel flips the sign bit before the asm
            off, expect = 128, q
        else:
            u = rng.integers(0, 256, 4)
            z = int(rng.integers(0, 256))
            off, expect = z, u - z
        word = sum(int(u[i]) << (8 * i) for i in range(4))
        if bf:
            second = int(np.array([8388608.0 + off], dtype=np.float32).view(np.uint32)[0])
        else:
            h = 0xE400 | off
            second = h | (h << 16)
        out = run_ptx(asm, {2: word, 3: second})
        got = np.concatenate([_f16x2(out[r], dtype) for r in range(2)])
        np.testing.assert_array_equal(got, expect)
