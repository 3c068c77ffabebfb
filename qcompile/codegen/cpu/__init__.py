"""CPU kernels for ``qcompile::quantized_linear`` (docs/kernels-cpu.md).

- :func:`cpu_quantized_linear`: the op on CPU tensors (``dispatch.py`` picks the kernel)
- :func:`describe`: the kernel(s) a layer runs on CPU, and why, for the compile report
- ``kernels.py``: torch's packed GEMMs and their repacking; ``weight_cache.py``: prepacked and
  dequantized weights, built once per weight
"""

from qcompile.codegen.cpu.dispatch import PACKED_MAX_M, choose, cpu_quantized_linear, describe

__all__ = ["PACKED_MAX_M", "choose", "cpu_quantized_linear", "describe"]
