"""The online rotation ``qcompile::hadamard_transform`` on the GPU: a Triton fast Walsh–Hadamard
transform (``fwht.py``) and its host wrapper.

- :func:`triton_hadamard_transform`: checks, allocates, launches (``out=`` writes into a given
  tensor; the tests poison it first);
- :func:`unsupported_reason`: why the kernel does not take a call (the op then runs the
  reference, ``formats.orthogonal.hadamard_transform``);
- :func:`register_cuda_kernel`: makes the op dispatch CUDA tensors here (called at import; the op's
  default implementation imports this module on its first CUDA call).

Shapes: ``x [..., n]`` with ``n = P · MB``, ``P`` a power of two (butterfly in registers) and
``MB`` the block size (``block [MB, MB]``; none: ``MB = 1``); float16, bfloat16 or float32 in, the
same dtype out, float32 arithmetic inside (the block matmul in split 16-bit operands: about 1e-5
relative to the float64 result). Blocks larger than :data:`MAX_FUSED_BLOCK` (11008 = 32·344,
18944 = 128·148) are applied by one GEMM after the kernel, on the kernel's output in the input
dtype (16-bit inputs: one more rounding).
"""

from __future__ import annotations

import torch
import triton

from qcompile.codegen import triton_env
from qcompile.codegen.hadamard.fwht import fwht_kernel

__all__ = ["cuda_hadamard_transform", "triton_hadamard_transform", "unsupported_reason", "register_cuda_kernel",
           "launch_config"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TILE = 1 << 15
"""Largest row tile ``P · MB_PAD`` one program holds (14336 = 512·28 pads to 16384)."""
MAX_FUSED_BLOCK = 128
"""Largest block multiplied inside the kernel; beyond it (x registers + operands) the kernel
spills, and the block becomes one GEMM on the host after the butterfly."""
TILE_ELEMENTS = 8192
"""Elements per program the heuristic aims for (rows are batched up to it)."""


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def launch_config(n: int, mb: int) -> dict[str, int | bool]:
    """Tile and launch parameters for rows of ``n = P · mb`` (``HAS_BLOCK``: the block matmul is
    fused, ``mb`` ≤ :data:`MAX_FUSED_BLOCK`; a larger block is one host GEMM after the kernel)."""
    p = n // mb
    fused = 1 < mb <= MAX_FUSED_BLOCK
    mb_pad = max(16, _pow2(mb)) if fused else _pow2(mb)
    tile = p * mb_pad
    block_m = max(1, TILE_ELEMENTS // tile)
    if fused:
        block_m = max(block_m, -(-16 // p))  # the block matmul needs >= 16 rows
    block_m = min(_pow2(block_m), 64)
    bn = max(16, min(mb_pad, 8192 // mb_pad)) if fused else 16
    warps = 16 if block_m * tile >= 32768 else 8 if block_m * tile >= 8192 else 4
    return {"P": p, "LOG_P": p.bit_length() - 1, "MB": mb, "MB_PAD": mb_pad, "BLOCK_M": block_m, "BN": bn,
            "HAS_BLOCK": fused, "num_warps": warps}


def unsupported_reason(x: torch.Tensor, signs: torch.Tensor | None, block: torch.Tensor | None) -> str | None:
    """``None`` if the Triton kernel takes this call, else why not."""
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} (the kernel takes {', '.join(str(d) for d in DTYPES)})"
    if not (x.is_cuda or triton_env.interpreting()):
        return "not a CUDA tensor (and not under TRITON_INTERPRET=1)"
    if x.dim() == 0 or x.numel() == 0:
        return "empty input"
    n = x.shape[-1]
    mb = block.shape[0] if block is not None else 1
    if block is not None and (block.dim() != 2 or block.shape[1] != mb):
        return f"block of shape {tuple(block.shape)} is not square"
    if n % mb or (n // mb) & (n // mb - 1):
        return f"last dimension {n} is not a power of two times the block size {mb}"
    if signs is not None and signs.numel() != n:
        return f"{signs.numel()} signs for {n} channels"
    cfg = launch_config(n, mb)
    if cfg["P"] * cfg["MB_PAD"] > MAX_TILE:
        return f"row of {n} = {cfg['P']}·{mb} pads to {cfg['P'] * cfg['MB_PAD']} > {MAX_TILE} elements per program"
    return None


def triton_hadamard_transform(x: torch.Tensor, signs: torch.Tensor | None, block: torch.Tensor | None,
                              scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x · diag(signs) · (H_P ⊗ block) · scale`` along the last dimension (see the module doc)."""
    reason = unsupported_reason(x, signs, block)
    if reason is not None:
        raise ValueError(f"triton_hadamard_transform: {reason}")
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if out is None:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
            raise ValueError(f"triton_hadamard_transform: out must be a contiguous {x.dtype} tensor of shape "
                             f"{tuple(x.shape)} on {x.device}, got {out.dtype} {tuple(out.shape)}")
        y = out.view(m, n)
    mb = block.shape[0] if block is not None else 1
    cfg = launch_config(n, mb)
    s = signs.to(device=x.device, dtype=torch.float32).contiguous() if signs is not None else None
    b = block.to(device=x.device, dtype=torch.float32).contiguous() if block is not None else None
    exact = _is_sign_matrix(block)
    warps = cfg.pop("num_warps")
    host_block = b is not None and not cfg["HAS_BLOCK"]
    stage = torch.empty_like(y) if host_block else y
    triton_env.before_launch()
    grid = (triton.cdiv(m, cfg["BLOCK_M"]),)
    fwht_kernel[grid](x2, stage, s if s is not None else x2, b if b is not None else x2, m, x2.stride(0),
                      stage.stride(0), float(scale), **cfg, HAS_SIGNS=s is not None, BLOCK_EXACT=exact,
                      EMULATE=triton_env.interpreting(), num_warps=warps)
    if host_block:  # (rows · P, MB) @ B: one GEMM in the input dtype (B exact when ±1)
        torch.matmul(stage.view(-1, mb), b.to(x.dtype), out=y.view(-1, mb))
    return y.view(x.shape) if out is None else out


_EXACT: dict[tuple, bool] = {}


def _is_sign_matrix(b: torch.Tensor | None) -> bool:
    """Whether the block holds only ``±1`` (exact in bfloat16). Cached per tensor (data pointer,
    version): the check synchronizes once per buffer, never inside a CUDA graph replay."""
    if b is None:
        return True
    key = (b.data_ptr(), b._version, tuple(b.shape), str(b.device))
    if key not in _EXACT:
        if len(_EXACT) > 256:
            _EXACT.clear()
        _EXACT[key] = bool(((b == 1) | (b == -1)).all())
    return _EXACT[key]


def cuda_hadamard_transform(x: torch.Tensor, signs: torch.Tensor | None, block: torch.Tensor | None, scale: float,
                            groups: int = 1) -> torch.Tensor:
    """The op on CUDA tensors: the Triton kernel, or the reference for calls it does not take;
    ``groups > 1`` runs it on each group as a row of its own."""
    if groups != 1:
        if groups < 1 or x.shape[-1] % groups:
            raise ValueError(f"hadamard_transform: {groups} groups do not divide the last dimension {x.shape[-1]}")
        grouped = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
        return cuda_hadamard_transform(grouped, signs, block, scale).reshape(x.shape)
    if unsupported_reason(x, signs, block) is None:
        return triton_hadamard_transform(x, signs, block, scale)
    from qcompile.formats.orthogonal import hadamard_transform

    return hadamard_transform(x, signs, block, scale)


_REGISTERED: list[bool] = []


def register_cuda_kernel() -> None:
    """Make ``qcompile::hadamard_transform`` run this kernel on CUDA tensors (idempotent); calls
    the kernel does not take (float64, odd shapes) run the reference."""
    if _REGISTERED:
        return
    import qcompile.ir.ops  # noqa: F401  (defines the op)

    torch.library.register_kernel("qcompile::hadamard_transform", "cuda", cuda_hadamard_transform)
    _REGISTERED.append(True)


register_cuda_kernel()
