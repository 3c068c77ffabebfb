"""Work around a Triton-interpreter / NumPy >= 2.3 incompatibility.

Under ``TRITON_INTERPRET=1`` scalar kernel arguments become 1-element NumPy
arrays, and the interpreter's ``tensor.__index__`` calls ``int(array)``, which
NumPy >= 2.3 rejects for 1-D arrays. Any ``for k in range(0, K, BLOCK)`` with a
runtime bound then fails. We re-register ``__index__`` to read the single element.
Harmless (a no-op) on compiled GPU runs and on fixed Triton versions.
"""

from __future__ import annotations


def patch_triton_interpreter() -> None:
    try:
        from triton.runtime import interpreter as interp
    except ImportError:  # pragma: no cover - triton without an interpreter
        return
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
