"""Passes, imported explicitly so that every built-in pass is registered by name.

One pass family a file: ``spec_assignment`` (recipe → decisions), ``norm_folding``,
``weight_quantization`` (decisions → results), ``outlier_splitting`` (LLM.int8, dense-and-sparse,
residual channels), plus ``canonicalize`` (frontend) and ``lower``
(codegen). ``base`` is the framework, ``calibration`` the statistics service.
"""

from qcompile.codegen.lowering import Lower
from qcompile.frontend.canonicalize import Canonicalize
from qcompile.passes.base import (
    OnLoad,
    Pass,
    PassContext,
    PassManager,
    PassOrderError,
    PassRequirementError,
    PassResult,
    make_pass,
    order_passes,
    register_pass,
    registered_passes,
)
from qcompile.passes.calibration import ActivationStats, Calibration
from qcompile.passes.clip_search import ClipSearch
from qcompile.passes.fusion import FuseEpilogues, FuseSiblingLinears
from qcompile.passes.gptq import GPTQ
from qcompile.passes.mixed_precision import MixedPrecision
from qcompile.passes.norm_folding import FoldNormScales
from qcompile.passes.outlier_splitting import OutlierSplit, ResidualChannels
from qcompile.passes.rotation import RotateResidual
from qcompile.passes.rotation_heads import RotateHeads
from qcompile.passes.rotation_online import RotateOnline
from qcompile.passes.scale_migration import AWQ, AWQClip, OSShift, SmoothQuant
from qcompile.passes.spec_assignment import AssignQuantSpecs
from qcompile.passes.weight_quantization import QuantizeWeights, WeightQuantizer

__all__ = [
    "AWQ", "GPTQ", "AWQClip", "ClipSearch", "FuseEpilogues", "FuseSiblingLinears", "MixedPrecision", "OSShift", "RotateHeads", "RotateOnline", "RotateResidual",
    "SmoothQuant", "ActivationStats", "AssignQuantSpecs", "Calibration", "Canonicalize", "FoldNormScales", "Lower",
    "OnLoad", "OutlierSplit", "Pass", "PassContext", "PassManager", "PassOrderError", "PassRequirementError",
    "PassResult", "QuantizeWeights", "ResidualChannels", "WeightQuantizer", "make_pass", "order_passes", "register_pass",
    "registered_passes",
]
