"""The inline PTX of decode attention (int4 / int2 / int8 codes -> fp16 bit tricks), run on CPU by
the PTX emulator of ``test_int_mma_ptx`` (plus ``xor.b32`` on inputs, below). The interpreter
tests run the plain-Triton twin of each asm (``ASM=False``); this checks that the asm computes
the same numbers, for every byte value, in the order each output register is read.

Every asm here is elementwise per byte: element ``k`` of a 4-element pack is byte ``k`` of the
input register, and output ``i`` of that element is the low (``$2i``) or high (``$2i+1``) half
of the output registers: ``(e0, e1)`` in the first register of an output, ``(e2, e3)`` in the
second."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from qcompile.codegen.attention import bits
from tests.codegen.test_int_mma_ptx import _f16x2, run_ptx


def run_ptx_ext(text: str, args: dict[int, int]) -> dict[int, int]:
    """``run_ptx`` plus ``xor.b32 r, $n, imm`` (only on input registers): folded into a ``mov``."""
    lines = []
    for line in text.splitlines():
        m = re.fullmatch(r"\s*xor\.b32\s+(\w+),\s*\$(\d+),\s*(0x[0-9a-fA-F]+);\s*", line)
        if m:
            val = (args[int(m.group(2))] ^ int(m.group(3), 16)) & 0xFFFFFFFF
            line = f"mov.b32 {m.group(1)}, {val:#x};"
        lines.append(line)
    return run_ptx("\n".join(lines), args)


def _words(byte_values: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """All byte values, four per 32-bit word (byte k = element k), in shuffled order."""
    rng = np.random.default_rng(0)
    b = np.concatenate([byte_values, rng.permutation(byte_values)]).astype(np.int64)
    b = b[: len(b) // 4 * 4].reshape(-1, 4)
    return [(int(sum(int(w[k]) << (8 * k) for k in range(4))), w) for w in b]


def _halves(regs: dict[int, int], first: int) -> np.ndarray:
    """Four fp16 values of one output tensor: registers ``first`` and ``first + 1``."""
    return np.concatenate([_f16x2(regs[first], torch.float16), _f16x2(regs[first + 1], torch.float16)])


def test_int4_asm_nibbles_elementwise():
    asm = bits.I4_TO_F16.value
    for word, e in _words(np.arange(256)):
        out = run_ptx_ext(asm, {4: word})
        np.testing.assert_array_equal(_halves(out, 0), e & 15)          # channel 2x
        np.testing.assert_array_equal(_halves(out, 2), e >> 4)          # channel 2x + 1


def test_int2_asm_crumbs_elementwise():
    asm = bits.I2_TO_F16.value
    for word, e in _words(np.arange(256)):
        out = run_ptx_ext(asm, {8: word})
        for i in range(4):                                              # channel 4x + i
            np.testing.assert_array_equal(_halves(out, 2 * i), (e >> (2 * i)) & 3)


def test_int4_magic_asm_elementwise():
    """Key codes without the fma: 1024 + low nibble, 1024 + 16 * high nibble."""
    asm = bits.I4_TO_MAGIC.value
    for word, e in _words(np.arange(256)):
        out = run_ptx_ext(asm, {4: word})
        np.testing.assert_array_equal(_halves(out, 0), 1024 + (e & 15))
        np.testing.assert_array_equal(_halves(out, 2), 1024 + (e & 0xF0))


def test_int2_magic_asm_elementwise():
    asm = bits.I2_TO_MAGIC.value
    for word, e in _words(np.arange(256)):
        out = run_ptx_ext(asm, {8: word})
        for i in range(4):
            np.testing.assert_array_equal(_halves(out, 2 * i), 1024 + (e & (3 << (2 * i))))


def test_int8_asm_signed_bytes_elementwise():
    asm = bits.I8_TO_F16.value
    for word, e in _words(np.arange(256)):
        out = run_ptx_ext(asm, {2: word})
        signed = np.where(e >= 128, e - 256, e)
        np.testing.assert_array_equal(_halves(out, 0), signed)


@pytest.mark.parametrize("name", ["I4_TO_F16", "I2_TO_F16", "I4_TO_MAGIC", "I2_TO_MAGIC", "I8_TO_F16"])
def test_asm_uses_only_emulated_instructions(name):
    """Every instruction of the asm is one the emulator runs (so the tests above saw all of it)."""
    known = {"mov.b32", "shr.b32", "prmt.b32", "lop3.b32", "fma.rn.f16x2", "xor.b32"}
    for line in getattr(bits, name).value.splitlines():
        line = line.strip()
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        assert line.split()[0] in known, line
