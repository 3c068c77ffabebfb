"""Float64 references for the GEMM kernels, written straight from the canonical layout
in ``qcompile/formats/spec.py`` (independent of the kernels' code paths), plus a
generator of random QuantizedTensors for tests and benchmarks."""

from __future__ import annotations

import torch

from qcompile.formats.floating import E2M1_VALUES as _E2M1_VALUES
from qcompile.formats.floating import E4M3_MAX
from qcompile.formats.spec import PER_CHANNEL, QuantizedTensor, QuantSpec

E2M1_VALUES = _E2M1_VALUES.to(torch.float64)


def unpack_nibbles(data: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, Kp/2]`` -> codes ``[N, Kp]``; element 2i is the low nibble."""
    lo = data & 0xF
    hi = data >> 4
    return torch.stack([lo, hi], dim=-1).reshape(data.shape[0], -1)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unpack_nibbles` (``codes`` uint8 0..15, even K)."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def _scale64(qt: QuantizedTensor) -> torch.Tensor:
    fmt = qt.spec.format
    if fmt in ("mxfp4", "mxfp8"):
        s = torch.exp2(qt.scale.to(torch.float64) - 127.0)
    else:
        s = qt.scale.to(torch.float64)
    if qt.global_scale is not None:
        s = s * qt.global_scale.to(torch.float64)
    return s


def dequantize_reference(qt: QuantizedTensor) -> torch.Tensor:
    """Canonical QuantizedTensor -> float64 ``[N, K]``."""
    fmt = qt.spec.format
    N, K = qt.shape
    if fmt == "int4":
        codes = unpack_nibbles(qt.data).to(torch.float64)
    elif fmt in ("fp4_e2m1", "nvfp4", "mxfp4"):
        codes = E2M1_VALUES.to(qt.data.device)[unpack_nibbles(qt.data).long()]
    elif fmt in ("int8", "fp8_e4m3", "mxfp8"):
        codes = qt.data.to(torch.float64)
    else:
        raise NotImplementedError(fmt)
    G = qt.scale.shape[1]
    gs = codes.shape[1] // G
    codes = codes.reshape(N, G, gs)
    if fmt == "int4":
        off = qt.zero.to(torch.float64)[:, :, None] if qt.zero is not None else 8.0
        codes = codes - off
    w = codes * _scale64(qt)[:, :, None]
    return w.reshape(N, -1)[:, :K]


def fake_quant_act_fp8(x: torch.Tensor) -> torch.Tensor:
    """Per-token e4m3 round trip, as the kernel does it (fp32 scale = amax / 448)."""
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
    q = (xf / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.to(torch.float64) * s.to(torch.float64)


def reference_linear(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                     act_spec: QuantSpec | None = None, residual: torch.Tensor | None = None,
                     epilogue: str = "none") -> torch.Tensor:
    """Float64 ``x @ dequant(W).T`` (+ bias, silu_mul, residual)."""
    if act_spec is None:
        xd = x.to(torch.float64)
    elif act_spec.format in ("nvfp4", "mxfp4"):
        # W4A4: the formats library's own per-token block quantization (independent of the kernel's)
        from qcompile.formats import fake_quantize

        # (on the CPU: the library's reference semantics, whatever device x is on)
        xd = fake_quantize(x.double().cpu(), QuantSpec(act_spec.format)).to(x.device)
    else:
        xd = fake_quant_act_fp8(x)
    y = xd @ dequantize_reference(qt).T
    if bias is not None:
        y = y + bias.to(torch.float64)
    if epilogue == "silu_mul":
        n = y.shape[-1] // 2
        g, u = y[..., :n], y[..., n:]
        y = g * torch.sigmoid(g) * u
    if residual is not None:
        y = y + residual.to(torch.float64)
    return y


def random_quantized(spec: QuantSpec, N: int, K: int, device: str | torch.device = "cpu",
                     generator: torch.Generator | None = None, weight_std: float = 0.02) -> QuantizedTensor:
    """A random canonical QuantizedTensor whose dequantized entries have std ~ ``weight_std``."""
    fmt = spec.format
    group = spec.group_size if spec.group_size != PER_CHANNEL else K
    G = -(-K // group)
    Kp = G * group

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    def randint(lo: int, hi: int, *shape: int) -> torch.Tensor:
        return torch.randint(lo, hi, shape, generator=generator)

    valid = torch.zeros(N, Kp, dtype=torch.bool)
    valid[:, :K] = True
    sdtype = getattr(torch, spec.scale_dtype)
    zero = gscale = None
    if fmt == "int4":
        codes = torch.where(valid, randint(0, 16, N, Kp), 8 if spec.symmetric else 0).to(torch.uint8)
        if not spec.symmetric:
            zero = randint(4, 12, N, G).to(torch.uint8)
            codes = torch.where(valid, codes, zero.repeat_interleave(group, dim=1))
        data = pack_nibbles(codes)
        scale = (weight_std / 4.6 * (0.5 + rand(N, G))).to(sdtype)
    elif fmt == "int8":
        data = torch.where(valid, randint(-127, 128, N, Kp), 0).to(torch.int8)
        scale = (weight_std / 73.0 * (0.5 + rand(N, G))).to(sdtype)
    elif fmt in ("fp8_e4m3", "mxfp8"):
        data = torch.where(valid, (torch.randn(N, Kp, generator=generator) * 64).clamp(-E4M3_MAX, E4M3_MAX), 0).to(torch.float8_e4m3fn)
        if fmt == "mxfp8":
            scale = randint(127 - 14, 127 - 10, N, G).to(torch.uint8)
        else:
            scale = (weight_std / 64 * (0.5 + rand(N, G))).to(sdtype)
    elif fmt in ("fp4_e2m1", "nvfp4", "mxfp4"):
        data = pack_nibbles(torch.where(valid, randint(0, 16, N, Kp), 0).to(torch.uint8))
        if fmt == "nvfp4":
            scale = (1.0 + 3 * rand(N, G)).to(torch.float8_e4m3fn)
            gscale = torch.tensor(weight_std / 6.0, dtype=torch.float32)
        elif fmt == "mxfp4":
            scale = randint(127 - 8, 127 - 5, N, G).to(torch.uint8)
        else:
            scale = (weight_std / 2.5 * (0.5 + rand(N, G))).to(sdtype)
    else:
        raise NotImplementedError(fmt)
    qt = QuantizedTensor(spec, (N, K), data, scale, zero, gscale)
    return qt.to(device)
