"""The Triton fast Walsh–Hadamard transform: ``y = ((x ⊙ s) · (H_P ⊗ B)) · c`` per row.

One program owns ``BLOCK_M`` whole rows, loaded as a ``(BLOCK_M, P, MB_PAD)`` tile (column
``i_p · MB + i_m`` of the row; the block dimension padded to a power of two and masked):

1. signs: one multiply;
2. ``H_P`` (Sylvester, ``P = 2^LOG_P``): ``LOG_P`` in-register butterfly stages, stage ``k`` pairing
   the rows ``i_p`` whose bit ``k`` differs (``reshape`` to ``(…, 2, 2^k · MB_PAD)``, ``split``,
   ``(a + b, a − b)``, ``join``);
3. ``HAS_BLOCK`` (blocks up to ``MAX_FUSED_BLOCK`` = 128): the block ``B`` (``MB × MB``, ``±1``
   Hadamard or random orthogonal) as a small matmul of the ``(BLOCK_M · P, MB_PAD)`` tile with
   ``BN``-wide column chunks of ``B`` on tensor cores, in bfloat16 operands split hi + lo
   (``x = x_hi + x_lo``; a non-``±1`` block is split too), so the result keeps about 16 bits of
   precision; under the interpreter the dots run exactly in float32 (``triton_env.dot``'s
   emulation). Larger blocks (11008 = 32·344, 18944 = 128·148) would spill registers: the kernel
   then stops after the butterfly and the host multiplies by ``B`` with one GEMM;
4. scale ``c`` and one store in the output dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qcompile.codegen.triton_env import dot


@triton.jit
def fwht_kernel(x_ptr, y_ptr, signs_ptr, block_ptr, M, stride_xm, stride_ym, scale,
                P: tl.constexpr, LOG_P: tl.constexpr, MB: tl.constexpr, MB_PAD: tl.constexpr,
                BLOCK_M: tl.constexpr, BN: tl.constexpr, HAS_SIGNS: tl.constexpr, HAS_BLOCK: tl.constexpr,
                BLOCK_EXACT: tl.constexpr, EMULATE: tl.constexpr):
    """One program: ``BLOCK_M`` rows of ``n = P · MB`` (see the module docstring)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ip = tl.arange(0, P)
    im = tl.arange(0, MB_PAD)
    col = ip[:, None] * MB + im[None, :]  # (P, MB_PAD)
    rmask = rows < M
    cmask = im < MB
    mask = rmask[:, None, None] & cmask[None, None, :]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None, None] * stride_xm + col[None, :, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_SIGNS:
        s = tl.load(signs_ptr + col, mask=cmask[None, :], other=0.0)
        x = x * s[None, :, :]
    for k in tl.static_range(LOG_P):
        x = tl.reshape(x, (BLOCK_M * (P >> (k + 1)), 2, (1 << k) * MB_PAD))
        x = tl.permute(x, (0, 2, 1))
        a, b = tl.split(x)
        x = tl.join(a + b, a - b)
        x = tl.permute(x, (0, 2, 1))
    x = tl.reshape(x, (BLOCK_M, P, MB_PAD))
    if HAS_BLOCK:
        x2 = tl.reshape(x, (BLOCK_M * P, MB_PAD))
        x_hi = x2.to(tl.bfloat16)  # split operands: x = x_hi + x_lo, each exact in bfloat16
        x_lo = (x2 - x_hi.to(tl.float32)).to(tl.bfloat16)
        for j0 in tl.static_range(0, MB_PAD, BN):
            jn = j0 + tl.arange(0, BN)
            bmask = cmask[:, None] & (jn < MB)[None, :]
            blk = tl.load(block_ptr + im[:, None] * MB + jn[None, :], mask=bmask, other=0.0).to(tl.float32)
            b_hi = blk.to(tl.bfloat16)
            acc = tl.zeros((BLOCK_M * P, BN), dtype=tl.float32)
            acc = dot(x_hi, b_hi, acc, EMULATE)
            acc = dot(x_lo, b_hi, acc, EMULATE)
            if not BLOCK_EXACT:  # a random block is split too
                acc = dot(x_hi, (blk - b_hi.to(tl.float32)).to(tl.bfloat16), acc, EMULATE)
            out = tl.reshape(acc * scale, (BLOCK_M, P, BN))
            ocol = ip[:, None] * MB + jn[None, :]
            omask = rmask[:, None, None] & (jn < MB)[None, None, :]
            tl.store(y_ptr + rows.to(tl.int64)[:, None, None] * stride_ym + ocol[None, :, :],
                     out.to(y_ptr.dtype.element_ty), mask=omask)
    else:
        tl.store(y_ptr + rows.to(tl.int64)[:, None, None] * stride_ym + col[None, :, :],
                 (x * scale).to(y_ptr.dtype.element_ty), mask=mask)
