"""ONNX export: a compiled model as one ONNX file stock ONNX Runtime runs (docs/onnx-export.md).

Needs the ``onnx`` extra (onnx, onnxscript, onnx-ir, onnxruntime); ``qcompile.export_onnx`` imports
this package on first use.
"""

from qcompile.onnx_export.export import ExportReport, export_onnx
from qcompile.onnx_export.lowering import LayerExport, OnnxExportError, lower_for_onnx

__all__ = ["ExportReport", "LayerExport", "OnnxExportError", "export_onnx", "lower_for_onnx"]
