"""Where the Triton kernels meet their environment: the interpreter, the GPU, and the dot product
that must work on both.

- :func:`interpreting`: the one reader of ``TRITON_INTERPRET``. Under the interpreter kernels take
  their plain-Triton twins (no inline asm) and :func:`dot`'s emulated path.
- :func:`num_sms`: streaming multiprocessors of a device (cached); ``default`` off CUDA.
- :func:`dot`: ``acc + a @ b`` on tensor cores, or exactly in float32 under the interpreter.
- :func:`apply_interpreter_compat` / :func:`interpreter_compat_active`: a patch of the Triton
  interpreter (NumPy >= 2.3 rejects ``int()`` of the 1-element arrays it makes of scalar kernel
  arguments, so a ``range`` with a runtime bound fails). It is applied only where the interpreter
  runs: by ``qcompile.codegen.gemm.force_triton()``, by the tests' ``conftest.py`` and by every
  host wrapper right before a launch (:func:`before_launch`), never at import.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

NUM_SMS_DEFAULT = 132
"""SMs assumed off CUDA (an H100 SXM's count): tile heuristics stay GPU-shaped under the interpreter."""


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=16)
def num_sms(device: torch.device, default: int = NUM_SMS_DEFAULT) -> int:
    """Streaming multiprocessors of ``device``; ``default`` for a device that is not CUDA."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return default


@triton.jit
def dot(a, b, acc, EMULATE: tl.constexpr):
    """``acc + a @ b`` in float32. The Triton interpreter mis-computes ``tl.dot`` on 16-bit and
    fp8 operands, so with ``EMULATE`` both (already rounded) operands are upcast to float32 and
    multiplied exactly; otherwise a plain tensor-core ``tl.dot``."""
    if EMULATE:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


# ----------------------------------------------------------------------------- interpreter patch
def _interpreter():
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - triton without an interpreter
        return None
    return interpreter


def interpreter_compat_active() -> bool:
    """Whether :func:`apply_interpreter_compat` has patched this process's Triton interpreter."""
    interp = _interpreter()
    return bool(getattr(getattr(interp, "_patch_lang_tensor", None), "_qcompile_patched", False))


def apply_interpreter_compat() -> None:
    """Make the interpreter's ``tensor.__index__`` read the single element of a 1-element array
    (what NumPy >= 2.3 no longer does in ``int(array)``). Idempotent; harmless on Triton versions
    that do not need it; it touches only the interpreter, never compiled GPU runs."""
    interp = _interpreter()
    original = getattr(interp, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_qcompile_patched", False):
        return

    def _index(self) -> int:
        data = self.handle.data
        return int(data.reshape(-1)[0]) if data.size == 1 else int(data)

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    patched._qcompile_patched = True
    interp._patch_lang_tensor = patched


def before_launch() -> None:
    """Host wrappers call this right before launching a kernel: under the interpreter it applies
    the compatibility patch (a no-op once applied); on GPUs it does nothing."""
    if interpreting():
        apply_interpreter_compat()
