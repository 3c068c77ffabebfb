"""GPTQ's math (Frantar et al., 2022), with no FX and no pass machinery: ``gptq_quantize``.

Given a weight ``W [N, K]`` and the Hessian of its layer's input ``H = Σ xᵀx [K, K]`` (any
positive multiple: GPTQ's ``2XᵀX/n`` gives the same result), choose quantized weights ``Q`` that
keep ``tr((W − Q) H (W − Q)ᵀ)`` -- the layer's squared output error on the calibration rows -- small:
columns are rounded one at a time and each column's rounding error is pushed onto the columns not
yet rounded, through the inverse Hessian (the optimal correction for a quadratic loss).

- Dead input channels (``H[j, j] == 0``: the input is always zero) get ``W[:, j] = 0`` and
  ``H[j, j] = 1``; they cannot matter, and the count is reported.
- Damping: ``damp · mean(diag H)`` is added to the diagonal (``damp = 0.01``), so that the
  Cholesky factorisation exists and the corrections stay bounded. If the factorisation still
  fails (float32, a nearly singular H), the damping is multiplied by 10, up to 4 times; the
  value used is reported.
- The inverse is used through the upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``): row
  ``i`` of ``U`` divided by ``U[i, i]`` is exactly the correction GPTQ applies after rounding
  column ``i``, for every order of columns.
- Blocked lazy updates: columns are processed in blocks of ``block_size``; inside a block the
  corrections go to the block's own columns, the rest of the matrix gets one matrix product per
  block.
- Activation order (``act_order``): columns are processed by decreasing ``diag(H)`` (the inputs
  with the most energy first, while many columns are left to absorb their error), with **static
  groups**: every group's parameters (scale, zero point, NVFP4's global scale) are those
  ``quantize`` derives from the original weight's group in the original column order, fixed before
  any column is rounded. So the result is an ordinary ``QuantizedTensor`` in the canonical layout
  (group ``g`` = columns ``g·G … (g+1)·G − 1``) that every kernel reads unchanged.
- The grid comes from the formats library (``formats.fixed_grid``): any integer format and group
  size, symmetric or asymmetric, fp8 / fp4, NVFP4, MXFP4, MXFP8. The returned tensor dequantizes
  to exactly the weights GPTQ decided on.

Everything runs on the device of ``weight`` in float32 (the proxy losses are evaluated in
float64); the only Python loop is GPTQ's loop over the columns of a block.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from qcompile.formats import QuantizedTensor, QuantSpec, dequantize, quantize
from qcompile.formats.fixed_grid import FixedGrid, code_bytes, from_code_bytes

DAMP_RETRIES = 4
"""Times the damping is multiplied by 10 when the Cholesky factorisation fails."""


@dataclass(frozen=True)
class GPTQInfo:
    """What one ``gptq_quantize`` call did.

    ``damp``: the value added to the Hessian's diagonal (absolute, not the relative ``damp``
    argument). ``proxy_loss_rtn`` / ``proxy_loss_gptq``: ``tr((W − Q) H (W − Q)ᵀ)`` with the
    given (undamped) ``H`` for round-to-nearest (``quantize(W, spec)``) and for the result: the
    squared output error on the calibration rows, in the units of ``H``.
    """

    dead_channels: int
    damp: float
    proxy_loss_rtn: float
    proxy_loss_gptq: float
    act_order: bool = True
    block_size: int = 128

    @property
    def loss_ratio(self) -> float:
        """``proxy_loss_gptq / proxy_loss_rtn`` (1.0 when RTN is exact)."""
        return self.proxy_loss_gptq / self.proxy_loss_rtn if self.proxy_loss_rtn > 0 else 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def proxy_loss(weight: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W − Q) H (W − Q)ᵀ)`` in float64."""
    d = weight.double() - q.to(weight.device).double()
    return float(((d @ hessian.to(d.device).double()) * d).sum())


def _inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)`` (raised ×10 while
    the factorisation fails), and ``λ``."""
    mean_diag = float(torch.diagonal(h).mean())
    lam = damp * mean_diag
    eye = torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    for attempt in range(DAMP_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper, lam
        if attempt < DAMP_RETRIES:
            lam = lam * 10 if lam > 0 else 1e-6 * max(mean_diag, 1e-30)
    raise ValueError(f"the Hessian is not positive definite even with damping {lam:.3e} "
                     f"(mean diagonal {mean_diag:.3e}); is it finite and symmetric?")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, *, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = True,
                  grid: QuantizedTensor | None = None) -> tuple[QuantizedTensor, GPTQInfo]:
    """Quantize ``weight [N, K]`` to ``spec`` with GPTQ, given the input Hessian ``hessian [K, K]``.

    ``grid``: the static groups' parameters (scales, zero points) to round to, e.g. an
    error-minimising grid from ``clip_search_math.search_grid`` (its spec and shape must be
    ``spec`` and ``weight``'s; its codes are not used); default: ``quantize``'s min/max parameters
    of the original weight's groups. Returns the quantized tensor (canonical layout, ``dequantize``
    gives GPTQ's weights exactly) and a :class:`GPTQInfo`. Raises ``ValueError`` for shapes that do
    not fit, non-finite inputs, or bad options.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"the Hessian has shape {tuple(hessian.shape)}, a weight with K={k} needs ({k}, {k})")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0, got {damp!r}")
    w_orig = weight.detach().float()
    h_orig = hessian.detach().to(device=w_orig.device, dtype=torch.float32)
    if not bool(torch.isfinite(w_orig).all()):
        raise ValueError("the weight contains NaN or Inf")
    if not bool(torch.isfinite(h_orig).all()):
        raise ValueError("the Hessian contains NaN or Inf")

    w = w_orig.clone()
    h = h_orig.clone()
    dead = torch.diagonal(h) == 0
    n_dead = int(dead.sum())
    if n_dead:
        h[dead, dead] = 1.0
        w[:, dead] = 0.0

    # Static groups: the given grid, or the parameters of the (dead-zeroed) original weight.
    if grid is not None and (grid.spec != spec or tuple(grid.shape) != (n, k)):
        raise ValueError(f"the grid is {grid.spec.short()} {tuple(grid.shape)}, the weight needs "
                         f"{spec.short()} {(n, k)}")
    params_qt = quantize(w, spec)
    grid = FixedGrid(grid.to(w.device) if grid is not None else params_qt)

    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
    if perm is not None:
        w = w[:, perm]
        h = h[perm][:, perm]
    cols = perm if perm is not None else torch.arange(k, device=w.device)
    upper, lam = _inverse_cholesky(h, damp)
    del h

    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)  # code bytes, in processing order
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        params = grid.columns(cols[i1:i2])
        for i in range(i2 - i1):
            p = params.slice(i, i + 1)
            c, q = grid.round(w1[:, i:i + 1], p)
            codes[:, i1 + i:i1 + i + 1] = code_bytes(c)
            e = (w1[:, i:i + 1] - q) / u1[i, i]
            w1[:, i:] -= e @ u1[i:i + 1, i:]
            err1[:, i:i + 1] = e
        if i2 < k:
            w[:, i2:] -= err1 @ upper[i1:i2, i2:]

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    qt = grid.pack(from_code_bytes(codes, spec))

    rtn = params_qt if not n_dead else quantize(w_orig, spec)
    info = GPTQInfo(dead_channels=n_dead, damp=lam,
                    proxy_loss_rtn=proxy_loss(w_orig, dequantize(rtn), h_orig),
                    proxy_loss_gptq=proxy_loss(w_orig, dequantize(qt), h_orig),
                    act_order=act_order, block_size=block_size)
    return qt, info


def float_target(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, damp: float) -> torch.Tensor:
    """The weight GPTQ should approach so that the layer matches the *float* model's outputs:
    ``W̃ = W + W·Δ·(H̃ + λI)⁻¹`` with ``H̃ = Σ x̃ᵀx̃`` (the quantized model's inputs), ``Δ = Σ (x − x̃)ᵀx̃``
    (``x``: the float model's inputs on the same rows) and ``λ = damp · mean(diag H̃)``, GPTQ's own
    damping. Undamped, ``min_Q ‖XWᵀ − X̃Qᵀ‖² = tr((Q − W̃) H̃ (Q − W̃)ᵀ) + const``; ``Δ = 0`` (no
    earlier error) gives ``W̃ = W`` exactly. Float64 inside, returned in ``weight``'s dtype."""
    n, k = weight.shape
    if tuple(hessian.shape) != (k, k) or tuple(cross.shape) != (k, k):
        raise ValueError(f"the Hessian {tuple(hessian.shape)} and the cross term {tuple(cross.shape)} must both be "
                         f"({k}, {k}) for a weight with K={k}")
    h = hessian.double().to(weight.device)
    lam = max(damp * float(torch.diagonal(h).mean()), 1e-12 * max(float(torch.diagonal(h).max()), 1e-30))
    a = h + lam * torch.eye(k, dtype=h.dtype, device=h.device)
    m = weight.double() @ cross.double().to(weight.device)
    return (weight.double() + torch.linalg.solve(a, m.t()).t()).to(weight.dtype)
