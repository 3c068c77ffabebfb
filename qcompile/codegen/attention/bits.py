"""Codes to fp16 without conversion instructions: the PTX bit tricks of decode attention and
their plain-Triton twins (``ASM=False``, for the interpreter), elementwise per byte.

On Hopper ``I2F``/``F2F`` issue at a quarter of the FMA rate, so every code becomes fp16 with
integer bit tricks (``inline_asm_elementwise``, 4 bytes per call): a nibble (int4) or crumb (int2)
OR-ed into the mantissa of 1024.0 (fp16 ``0x6400``) is ``1024 + c`` (or ``1024 + 2^k c``), one
``fma.rn.f16x2`` removes the offset exactly, two codes at a time; int8: a byte (sign flipped) into
the mantissa of 1024.0, minus 1152; fp8 e4m3 uses the native paired ``cvt.rn.f16x2.e4m3x2``.
Every asm is elementwise per byte (channel ``PER*x + i`` of byte ``x`` goes to output ``i``), so
it computes the same numbers whatever register layout the compiler gives it. The asm is checked
on CPU by a PTX emulator (``tests/codegen/test_attention_ptx.py``).

``KV_*`` codes: ``qcompile.formats.kernel_codes``.
"""

from __future__ import annotations

import struct

import triton
import triton.language as tl

from qcompile.formats import kernel_codes

KV_FP8 = tl.constexpr(kernel_codes.KV_FP8)


def _byte_codes_asm(bits: int, subtract: bool) -> tl.constexpr:
    """PTX turning 4 bytes (``$<2·per>``, ``per = 8 // bits`` codes a byte) into fp16 codes.

    prmt gives p = [e0, e2, e1, e3] and q = p >> 8 = [e2, e1, e3, 0], so that
    ``(p & mask_i) | 0x6400`` is the fp16 pair (1024 + 2^(bits·i) c_i(e0), ... c_i(e1)) for code
    ``i`` of each byte (mask_i = ``2^bits - 1`` at bit ``bits·i`` of both halves), and q gives it
    for (e2, e3). Output ``i`` is registers ``$2i`` (from p) and ``$2i+1`` (from q). With
    ``subtract``, ``fma(x, 2^-(bits·i), -1024·2^-(bits·i))`` leaves the exact codes; without it
    the outputs stay ``1024 + 2^(bits·i) c`` (keys fold that into the query, see
    ``tiles.key_logits``).
    """
    per = 8 // bits
    regs, movs, lops, fmas = ["p", "q"], [], [], []
    for i in range(per):
        mask = ((1 << bits) - 1) << (bits * i)
        lops += [f"lop3.b32 ${2 * i + j}, {src}, 0x{mask << 16 | mask:08X}, 0x64006400, 0xEA;"
                 for j, src in enumerate("pq")]
        if subtract:
            w = 1 << (bits * i)
            sc, nb = ("one", "nb") if w == 1 else (f"s{w}", f"nb{w}")
            regs += [sc, nb]
            movs += [f"mov.b32 {sc}, 0x{_f16_bits(1 / w) * 0x10001:08X};",
                     f"mov.b32 {nb}, 0x{_f16_bits(-1024 / w) * 0x10001:08X};"]
            fmas += [f"fma.rn.f16x2 ${2 * i + j}, ${2 * i + j}, {sc}, {nb};" for j in range(2)]
    lines = ["{", f".reg .b32 {', '.join(regs)};", *movs, f"prmt.b32 p, ${2 * per}, 0, 0x3120;",
             "shr.b32 q, p, 8;", *lops, *fmas, "}"]
    return tl.constexpr("\n" + "\n".join(lines) + "\n")


def _f16_bits(x: float) -> int:
    return struct.unpack("<H", struct.pack("<e", x))[0]


I4_TO_F16 = _byte_codes_asm(4, subtract=True)     # (low nibble, high nibble) as fp16
I2_TO_F16 = _byte_codes_asm(2, subtract=True)     # the four 2-bit codes as fp16
I4_TO_MAGIC = _byte_codes_asm(4, subtract=False)  # keys: 1024 + c, 1024 + 16 c
I2_TO_MAGIC = _byte_codes_asm(2, subtract=False)  # keys: 1024 + 4^i c
# int8 (two's complement): flip the sign bit (u = q + 128), put u into the low byte of the fp16
# 1024.0 (0x64__), subtract 1152 = 1024 + 128: (q0, q1), (q2, q3) exactly.
I8_TO_F16 = tl.constexpr("""
{
.reg .b32 a, base, one, nb;
mov.b32 base, 0x64646464;
mov.b32 one, 0x3C003C00;
mov.b32 nb, 0xE480E480;
xor.b32 a, $2, 0x80808080;
prmt.b32 $0, a, base, 0x4140;
prmt.b32 $1, a, base, 0x4342;
fma.rn.f16x2 $0, $0, one, nb;
fma.rn.f16x2 $1, $1, one, nb;
}
""")
FENCE = tl.constexpr("fence.acq_rel.gpu; mov.b32 $0, 0;")



@triton.jit
def i4_unpack(byt, MAGIC: tl.constexpr, ASM: tl.constexpr):
    """uint8 bytes -> (low nibble, high nibble) as fp16, elementwise (channels 2x, 2x + 1);
    with ``MAGIC`` (keys) as 1024 + low nibble and 1024 + 16 * high nibble, no fma."""
    if ASM:
        return tl.inline_asm_elementwise(I4_TO_MAGIC if MAGIC else I4_TO_F16, "=r,=r,=r,=r,r",
                                         [byt], dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        b = byt.to(tl.int32)
        if MAGIC:
            return ((b & 15) + 1024).to(tl.float16), ((b & 0xF0) + 1024).to(tl.float16)
        else:
            return (b & 15).to(tl.float16), (b >> 4).to(tl.float16)


@triton.jit
def i2_unpack(byt, MAGIC: tl.constexpr, ASM: tl.constexpr):
    """uint8 bytes -> the four 2-bit codes (bits 2i..2i+1 = channel 4x + i) as fp16, elementwise;
    with ``MAGIC`` (keys) as 1024 + 4^i * code i, no fma."""
    if ASM:
        return tl.inline_asm_elementwise(I2_TO_MAGIC if MAGIC else I2_TO_F16,
                                         "=r,=r,=r,=r,=r,=r,=r,=r,r", [byt],
                                         dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                         is_pure=True, pack=4)
    else:
        b = byt.to(tl.int32)
        if MAGIC:
            return (((b & 3) + 1024).to(tl.float16), ((b & 0xC) + 1024).to(tl.float16),
                    ((b & 0x30) + 1024).to(tl.float16), ((b & 0xC0) + 1024).to(tl.float16))
        else:
            return ((b & 3).to(tl.float16), ((b >> 2) & 3).to(tl.float16),
                    ((b >> 4) & 3).to(tl.float16), ((b >> 6) & 3).to(tl.float16))


@triton.jit
def fp8_decode(code):
    """e4m3fn bits -> float32 by hand (the interpreter's fp8 conversion is unreliable)."""
    c = code.to(tl.int32)
    e = (c >> 3) & 0xF
    m = c & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    val = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    return tl.where((c & 0x80) != 0, -val, val)


@triton.jit
def byte_values(byt, FMT: tl.constexpr, ASM: tl.constexpr):
    """fp8 e4m3 bits (``FMT == KV_FP8``) or int8 codes (``KV_INT8``) -> fp16, exactly, elementwise."""
    if FMT == KV_FP8:
        if ASM:
            return byt.to(tl.float8e4nv, bitcast=True).to(tl.float16)
        else:
            return fp8_decode(byt).to(tl.float16)
    else:
        if ASM:
            return tl.inline_asm_elementwise(I8_TO_F16, "=r,=r,r", [byt], dtype=tl.float16,
                                             is_pure=True, pack=4)
        else:
            return byt.to(tl.float16)


@triton.jit
def channel_codes(byt, ch, BITS: tl.constexpr):
    """Codes of channels ``ch`` from ``byt`` ([rows, len(ch)], the byte holding each channel,
    ``ch // (8 // BITS)``, loaded once per channel): channel ``c`` sits at bit ``(c % PER) * BITS``.

    Each channel reads its byte again (L1 hits) rather than unpacking ``[rows, D*BITS/8]`` bytes
    with ``tl.join`` + ``tl.reshape``: on sm_90 (Triton 3.6) that interleave, feeding a dot of 16
    tokens (BLOCK_N = 16), gave wrong results natively while the interpreter computed them
    right. Only the generic (dequantize-everything) path uses this."""
    PER: tl.constexpr = 8 // BITS
    return (byt.to(tl.int32) >> ((ch % PER) * BITS)[None, :]) & ((1 << BITS) - 1)
