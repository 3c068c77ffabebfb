"""qcompile: a quantization compiler for PyTorch models.

    cm = qcompile.compile(model, example_inputs, target="cpu", recipe="w4a16")
    out = cm(*example_inputs)
    print(cm.report())
    qcompile.export_onnx(cm, example_inputs, "model.onnx")   # for ONNX Runtime (the onnx extra)
"""

from qcompile.api import compile, export_onnx
from qcompile.artifact import ArtifactError, load
from qcompile.compiled import CompiledModel
from qcompile.formats import QuantizedTensor, QuantSpec
from qcompile.ir.annotations import LayerDecision, LayerResult
from qcompile.passes import (
    OnLoad,
    Pass,
    PassContext,
    PassManager,
    PassResult,
    WeightQuantizer,
    register_pass,
    registered_passes,
)
from qcompile.recipes import RECIPES, Recipe, get_recipe
from qcompile.report import Report
from qcompile.targets import TARGETS, Target, get_target

__version__ = "0.1.0"

__all__ = [
    "RECIPES", "TARGETS", "ArtifactError", "CompiledModel", "LayerDecision", "LayerResult", "OnLoad", "Pass",
    "PassContext", "PassManager", "PassResult", "QuantSpec", "QuantizedTensor", "Recipe", "Report", "Target",
    "WeightQuantizer", "compile", "export_onnx", "get_recipe", "get_target", "load", "register_pass", "registered_passes",
]
