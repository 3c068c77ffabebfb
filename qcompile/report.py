"""The compile report: per-layer formats, sizes and errors, and model-level accuracy."""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text
from torch import fx

from qcompile.targets import Target


@dataclass
class LayerReport:
    path: str
    weight_format: str
    activation_format: str | None
    bits_per_weight: float
    bytes_before: int
    bytes_fp16: int
    bytes_after: int
    weight_rel_error: float
    output_rel_error: float | None = None
    method: str = "rtn"
    passes: dict[str, Any] = field(default_factory=dict)
    """What passes did to this layer, by pass name (``LayerDecision.extras``): rotation kind,
    smoothing alpha, clip ratios, GPTQ damping and errors, ..."""
    reason: str = ""
    """Why a layer left float is float (its decision's reason: a recipe exclude, an override, a
    convolution canonicalization cannot turn into a linear); empty for quantized layers."""
    kernel: str = ""
    """What runs this layer on the target's device, by tokens per call where that changes it, e.g.
    ``cpu:int4pack_mm (M<=16), cpu:dequant-cached (M>16)``, ``triton:int_mma``, ``reference``, ``torch``."""
    kernel_notes: list[str] = field(default_factory=list)
    """Where that kernel is simulated, emulated, the reference, or rounds (``Report.notes`` summarises them)."""


def layer_reports(gm: fx.GraphModule, target: Target | None = None) -> list[LayerReport]:
    """One row per decided layer (linears, and convolutions left float), in graph order, read from
    its result (quantized) or its float weight (kept float): the report never recomputes what a
    pass measured. With ``target``, each row says which kernel runs it there."""
    from qcompile.codegen.op_schema import QuantizedLinearCall, is_quantized_linear
    from qcompile.codegen.outlier_ops import kernel_note
    from qcompile.codegen.quantized_linear import describe_kernel
    from qcompile.ir.annotations import decided_nodes, result_of
    from qcompile.ir.graph import get_attr, module_path
    from qcompile.passes.outlier_splitting_math import SPLIT_KEY

    rows = []
    for node, decision in decided_nodes(gm):
        path = module_path(node)
        result = result_of(node)
        if is_quantized_linear(node) and result is not None:
            qt = QuantizedLinearCall.from_node(node).resolve(gm).quantized_weight()
            split = decision.extras.get(SPLIT_KEY) or {}
            in_features = qt.shape[1] - int(split.get("padded_channels", 0)) * ("form" in split)
            numel = qt.shape[0] * in_features
            side_bytes = int(split.get("side_bytes", 0))
            float_dtype = getattr(torch, result.float_dtype.removeprefix("torch."))
            itemsize = torch.empty((), dtype=float_dtype).element_size()
            kernel, kernel_notes = ("", []) if target is None else describe_kernel(
                target.kernels, target.is_native(qt.spec.format, result.activation.format if result.activation
                                                 is not None else None),
                qt.spec, result.activation, float_dtype, qt.shape[1])
            if split and target is not None:
                kernel_notes = [*kernel_notes, kernel_note(split["method"])]
            rows.append(LayerReport(
                path=path, weight_format=qt.spec.short(),
                activation_format=result.activation.short() if result.activation is not None else None,
                bits_per_weight=8.0 * (qt.nbytes() + side_bytes) / numel, bytes_before=numel * itemsize,
                bytes_fp16=numel * 2, bytes_after=qt.nbytes() + side_bytes, weight_rel_error=result.metrics.get("weight_rel_error", 0.0),
                output_rel_error=result.metrics.get("output_rel_error"), method=result.method,
                passes=dict(decision.extras), kernel=kernel, kernel_notes=kernel_notes))
        elif node.op == "call_function" and len(node.args) > 1 and getattr(node.args[1], "op", None) == "get_attr":
            w = get_attr(gm, node.args[1].target)
            rows.append(LayerReport(
                path=path, weight_format=str(w.dtype).removeprefix("torch."), activation_format=None,
                bits_per_weight=8.0 * w.element_size(), bytes_before=w.numel() * w.element_size(),
                bytes_fp16=w.numel() * 2, bytes_after=w.numel() * w.element_size(), weight_rel_error=0.0,
                output_rel_error=0.0, method="kept float", passes=dict(decision.extras),
                reason=decision.reason or f"decided by {decision.source}",
                kernel="torch" if target is not None else ""))
    return rows


@dataclass
class Report:
    """What compile() did. ``str(report)`` is a table; ``to_dict``/``to_json`` for tools."""

    model: str
    target: str
    recipe: str
    layers: list[LayerReport]
    output_cosine: float | None = None
    output_rel_error: float | None = None
    passes: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def float_layers(self) -> list[LayerReport]:
        """The layers left float, each with its reason."""
        return [layer for layer in self.layers if layer.method == "kept float"]

    @property
    def bytes_before(self) -> int:
        """Bytes of the decided layers' weights in the model's own float dtype."""
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_fp16(self) -> int:
        """Bytes the same weights take in 16-bit (the usual baseline for "×" smaller)."""
        return sum(layer.bytes_fp16 for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        """Bytes of the compiled layers' stored tensors (codes, scales, zero points, outlier splits'
        16-bit columns, sparse residuals and channel orders; float layers as they are)."""
        return sum(layer.bytes_after for layer in self.layers)

    @property
    def mixed_precision(self) -> dict[str, Any] | None:
        """The ``mixed_precision`` pass's record (budget or floor, proxy, chosen options, totals,
        predicted and measured error, Pareto front, solve–verify rounds), or ``None``."""
        return next((p["stats"] for p in self.passes if p["name"] == "mixed_precision" and p["stats"].get("layers")),
                    None)

    def plot(self, path: str | os.PathLike) -> str:
        """Write the mixed-precision picture (error–size Pareto front with the chosen point, bits per
        layer along the model) as a PNG; needs matplotlib (the ``plot`` extra). Returns the path."""
        from qcompile.report_plot import plot_mixed_precision

        return str(plot_mixed_precision(self, path))

    def mixed_precision_table(self) -> Table | None:
        """Per layer: the chosen option, its bits, the predicted error (the proxy, and the layer's own
        output error) and the layer output error measured after quantization; ``None`` without
        mixed precision."""
        mp = self.mixed_precision
        if mp is None:
            return None
        t = Table(title=f"mixed precision: {mp['mode']} {mp['budget'] or mp['quality']}, proxy {mp['proxy']}, "
                        f"method {mp['method']}")
        for col in ("layer", "option", "bits/w", f"predicted ({mp['proxy']})", "predicted layer err",
                    "measured layer err"):
            t.add_column(col, justify="left" if col in ("layer", "option") else "right")
        for layer in self.layers:
            rec = layer.passes.get("mixed_precision")
            if rec is None:
                continue
            pred = rec.get("predicted_layer_error")
            t.add_row(layer.path or "(root)", rec["option"], f"{rec['bits']:.2f}", f"{rec['predicted_error']:.3e}",
                      f"{pred:.4f}" if pred is not None else "-",
                      f"{layer.output_rel_error:.4f}" if layer.output_rel_error is not None else "-")
        totals = ", ".join(f"{k} {v:.4g}" for k, v in mp["totals"].items())
        t.caption = (f"{totals}; output error predicted {mp['predicted_error']:.3e}, measured {mp['measured_error']:.3e} "
                     f"(cosine {mp['measured_cosine']:.5f}, calibration set)")
        for i, it in enumerate(mp.get("iterations", []), 1):
            if "note" in it:
                t.caption += f"\nround {i}: {it['note']}"
            else:
                t.caption += (f"\nround {i}: error bound {it['error_bound']:.3e} → {it['bits']:.3f} bits, predicted "
                              f"{it['predicted_error']:.3e}, measured cosine {it['measured_cosine']:.5f}"
                              f" ({'meets' if it['meets_floor'] else 'misses'} the floor)")
        return t

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: every field, plus byte totals and the layers left float."""
        d = asdict(self)
        d["totals"] = {
            "linear_bytes_before": self.bytes_before,
            "linear_bytes_fp16": self.bytes_fp16,
            "linear_bytes_after": self.bytes_after,
            "ratio_to_fp16": self.bytes_after / self.bytes_fp16 if self.bytes_fp16 else None,
        }
        d["left_float"] = [{"path": layer.path, "reason": layer.reason} for layer in self.float_layers]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        """Inverse of :meth:`to_dict` (derived keys ignored), as ``report.json`` is read back."""
        d = {k: v for k, v in d.items() if k not in ("totals", "left_float")}
        d["layers"] = [LayerReport(**layer) for layer in d["layers"]]
        return cls(**d)

    def to_json(self, indent: int = 2) -> str:
        """The report as JSON text (:meth:`to_dict`)."""
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> Table:
        """The per-layer table as a ``rich`` Table (``print(report)`` shows it with the summary and
        notes)."""
        t = Table(title=f"qcompile: {self.model} → target {self.target}, recipe {self.recipe}", show_lines=False)
        cols = ["layer", "weights", "acts", "bits/w", "KiB before", "KiB after", "weight err", "output err"]
        touched = any(layer.passes for layer in self.layers)
        if touched:
            cols.append("passes")
        kernels = any(layer.kernel for layer in self.layers)
        if kernels:
            cols.append("kernel, 1 token")  # the full dispatch by tokens is LayerReport.kernel
        for col in cols:
            t.add_column(col, justify="left" if col in ("layer", "weights", "acts", "passes", "kernel, 1 token") else "right")
        for layer in self.layers:
            t.add_row(
                layer.path or "(root)", layer.weight_format, layer.activation_format or "-", f"{layer.bits_per_weight:.2f}",
                f"{layer.bytes_before / 1024:.1f}", f"{layer.bytes_after / 1024:.1f}",
                f"{layer.weight_rel_error:.4f}",
                f"{layer.output_rel_error:.4f}" if layer.output_rel_error is not None else "-",
                *([", ".join(_pass_label(k, v) for k, v in layer.passes.items())] if touched else []), *([layer.kernel.split(" (")[0]] if kernels else []),
            )
        t.add_section()
        t.add_row(
            f"total ({_layers(len(self.layers))})", "", "", "", f"{self.bytes_before / 1024:.1f}",
            f"{self.bytes_after / 1024:.1f}", "", "", *([""] if touched else []), *([""] if kernels else []),
        )
        t.caption = self._size_summary()
        if self.output_cosine is not None:
            t.caption += f"; model output vs float: cosine {self.output_cosine:.5f}, relative error {self.output_rel_error:.4f}"
        return t

    def _size_summary(self) -> str:
        if not self.layers or not self.bytes_fp16:
            return "no quantizable layer found: nothing was quantized"
        quantized = len(self.layers) - len(self.float_layers)
        size = f"layer weights {self.bytes_after / 2**20:.2f} MiB = {self.bytes_after / self.bytes_fp16:.3f}× of fp16"
        return size if quantized else f"nothing was quantized ({_layers(len(self.layers))} left float); {size}"

    def float_listing(self) -> str:
        """``left float:`` and one line per float layer with its reason (empty if none)."""
        lines = [f"  {layer.path or '(root)'}: {layer.reason}" for layer in self.float_layers]
        return "\n".join(["left float:", *lines]) if lines else ""

    def __str__(self) -> str:
        buf = io.StringIO()
        Console(file=buf, width=140, force_terminal=False).print(self)
        for note in self.notes:
            buf.write(f"note: {note}\n")
        return buf.getvalue()

    def __rich__(self) -> Group | Table:
        """The table, then the float layers with their reasons (notes are the caller's to print)."""
        listing = self.float_listing()
        parts = [self.table(), *([Text(listing)] if listing else [])]
        mp = self.mixed_precision_table()
        if mp is not None:
            parts.append(mp)
        return Group(*parts) if len(parts) > 1 else parts[0]


def _pass_label(name: str, record: Any) -> str:
    """A pass's cell in the table: its name; an outlier split also what it kept and its extra bytes."""
    if name != "outlier_split" or not isinstance(record, dict):
        return name
    method = record.get("method")
    kept = {"llm_int8": f"{record.get('channels')} ch 16-bit", "sparse": f"nnz {record.get('nnz')}",
            "residual_channels": f"{record.get('padded_channels')} residual ch"}.get(method, "")
    extra = record.get("extra_bytes")
    return f"{method} {kept}" + (f" +{extra / 1024:.1f} KiB" if isinstance(extra, (int, float)) else "")


def _layers(n: int) -> str:
    return f"{n} layer" + "s" * (n != 1)
