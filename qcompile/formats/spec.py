"""QuantSpec (what a tensor should become) and QuantizedTensor (what it became).

Passes attach specs; the formats library turns a float tensor and a spec into a
QuantizedTensor; lowering and kernels consume QuantizedTensors. Every tensor is
quantized as a 2-D matrix ``[rows, K]`` with groups running along the last
dimension ``K``: for a Linear weight the rows are output channels, for an
activation the rows are tokens.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

import torch

from .scales import SCALE_DTYPES

INT_FORMATS = ("int8", "int4", "int3", "int2")
FLOAT_FORMATS = ("fp8_e4m3", "fp8_e5m2", "fp4_e2m1")
BLOCK_FORMATS = ("nvfp4", "mxfp4", "mxfp8")
FORMATS = INT_FORMATS + FLOAT_FORMATS + BLOCK_FORMATS

BITS = {
    "int8": 8, "int4": 4, "int3": 3, "int2": 2,
    "fp8_e4m3": 8, "fp8_e5m2": 8, "fp4_e2m1": 4,
    "nvfp4": 4, "mxfp4": 4, "mxfp8": 8,
}
FIXED_BLOCK = {"nvfp4": 16, "mxfp4": 32, "mxfp8": 32}

PER_CHANNEL = 0
"""``group_size`` meaning one scale for a whole row (per output channel or per token)."""
PER_TENSOR = -1
"""``group_size`` meaning one scale (and zero point) for the whole tensor: dynamic activations only,
the granularity of ONNX Runtime's ``DynamicQuantizeLinear`` (``docs/formats.md``)."""

DEFAULT_SCALE_DTYPE = "float16"
"""Of int and plain-fp scales (``scales.SCALE_DTYPES``); block formats fix theirs (e4m3, e8m0)."""


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor.

    ``group_size`` is the number of consecutive elements along K that share a
    scale; ``PER_CHANNEL`` (0) means the whole row, ``PER_TENSOR`` (-1, dynamic
    integer activations only) the whole tensor. Block formats fix it (NVFP4 16,
    MX 32). ``dynamic`` is for activations: scales are computed at run time from
    the live tensor (per token, or per tensor), never calibrated.
    """

    format: str
    group_size: int = PER_CHANNEL
    symmetric: bool = True
    scale_dtype: str = DEFAULT_SCALE_DTYPE
    dynamic: bool = False

    def __post_init__(self) -> None:
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"unknown scale_dtype {self.scale_dtype!r}; valid: {', '.join(SCALE_DTYPES)}")
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; valid formats: {', '.join(FORMATS)}")
        if self.format in FIXED_BLOCK:
            block = FIXED_BLOCK[self.format]
            if self.group_size not in (PER_CHANNEL, block):
                raise ValueError(f"{self.format} uses blocks of {block}, not group_size={self.group_size}")
            object.__setattr__(self, "group_size", block)
        if self.group_size == PER_TENSOR:
            if not (self.dynamic and self.format in INT_FORMATS):
                raise ValueError(f"per-tensor scales (group_size={PER_TENSOR}) are for dynamic integer activations; "
                                 f"{self.format} {'activations' if self.dynamic else 'weights'} take per-channel "
                                 "(0) or group scales")
        elif self.group_size < 0:
            raise ValueError(f"group_size must be >= 0 (0 = per channel) or {PER_TENSOR} (per tensor), "
                             f"got {self.group_size}")
        if not self.symmetric and self.format not in INT_FORMATS:
            raise ValueError(f"asymmetric quantization is only defined for integer formats, not {self.format}")

    @property
    def bits(self) -> int:
        """Bits per stored code of the format (scales and zero points not included)."""
        return BITS[self.format]

    def short(self) -> str:
        """A compact human name, e.g. ``int4-g128-asym`` or ``nvfp4``."""
        if self.format in FIXED_BLOCK:
            return self.format
        group = {PER_CHANNEL: "pc", PER_TENSOR: "pt"}.get(self.group_size, f"g{self.group_size}")
        sym = "" if self.symmetric else "-asym"
        return f"{self.format}-{group}{sym}"

    def encode(self) -> str:
        """The whole spec as text that :meth:`parse` reads back into an equal spec:
        ``short()`` plus the scale dtype when it is not float16 and ``dynamic``, e.g.
        ``fp8_e4m3-pc-scale:float32-dynamic``. The op schema and artifacts carry specs this way."""
        parts = [self.short()]
        if self.scale_dtype != DEFAULT_SCALE_DTYPE:
            parts.append(f"scale:{self.scale_dtype}")
        if self.dynamic:
            parts.append("dynamic")
        return "-".join(parts)

    @classmethod
    @functools.lru_cache(maxsize=1024)
    def parse(cls, text: str) -> QuantSpec:
        """``"int4"``, ``"int4-g32"``, ``"int4-g128-asym"``, ``"nvfp4"``, ``"int8-pc"``,
        ``"fp8_e4m3-pc-scale:float32-dynamic"`` → QuantSpec (the inverse of :meth:`encode`). Cached:
        every call of a lowered op parses its spec strings, and specs are immutable."""
        if not isinstance(text, str) or not text:
            raise ValueError(f"a spec is a non-empty string like 'int4-g128-asym', got {text!r}")
        fmt, *tokens = text.split("-")
        fields: dict = {}
        for token in tokens:
            if token == "asym":
                fields["symmetric"] = False
            elif token == "sym":
                fields["symmetric"] = True
            elif token == "pc":
                fields["group_size"] = PER_CHANNEL
            elif token == "pt":
                fields["group_size"] = PER_TENSOR
            elif token == "dynamic":
                fields["dynamic"] = True
            elif token.startswith("g") and token[1:].isdigit():
                fields["group_size"] = int(token[1:])
            elif token.startswith("scale:") and token[6:] in SCALE_DTYPES:
                fields["scale_dtype"] = token[6:]
            else:
                raise ValueError(f"cannot parse {token!r} in spec {text!r} (expected gN, pc, pt, asym, sym, "
                                 f"dynamic or scale:<{'|'.join(SCALE_DTYPES)}>)")
        return cls(fmt, **fields)

    def to_dict(self) -> dict:
        """The fields as a plain dict (``QuantSpec.encode()`` is the compact text form)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)


@dataclass
class QuantizedTensor:
    """A quantized ``[rows, K]`` matrix in the canonical (kernel-facing) layout.

    - ``data``: codes. int8 → ``int8 [rows, K]``; int4/int3/int2 and fp4 → ``uint8``
      bit-packed along K, low bits first (see ``packing``); fp8/mxfp8 →
      ``float8_e4m3fn``/``float8_e5m2 [rows, K]``.
    - ``scale``: ``[rows, n_groups]`` (float16/bfloat16/float32 for int and plain fp
      formats, ``float8_e4m3fn`` for NVFP4, ``uint8`` biased e8m0 exponents for MX).
    - ``zero``: ``uint8 [rows, n_groups]`` integer zero points, asymmetric int only.
    - ``global_scale``: float32 scalar tensor, NVFP4 only (second-level scale).

    K is padded with zeros to a whole number of groups (and bytes); ``shape``
    keeps the logical, unpadded shape.
    """

    spec: QuantSpec
    shape: tuple[int, int]
    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def padded_k(self) -> int:
        """K rounded up to whole groups: the stored codes' width before packing."""
        return self.scale.shape[1] * self.group_size

    @property
    def group_size(self) -> int:
        """Elements per scale along K (the whole row for per-channel specs)."""
        return self.spec.group_size or self.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by role (``data``, ``scale``, and ``zero`` / ``global_scale`` where the
        format has them)."""
        out = {"data": self.data, "scale": self.scale}
        if self.zero is not None:
            out["zero"] = self.zero
        if self.global_scale is not None:
            out["global_scale"] = self.global_scale
        return out

    def nbytes(self) -> int:
        """Bytes of every stored tensor: codes, scales, zero points."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """A copy with every stored tensor on ``device``."""
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return QuantizedTensor(self.spec, self.shape, moved["data"], moved["scale"],
                               moved.get("zero"), moved.get("global_scale"), dict(self.extra))
