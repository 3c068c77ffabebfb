"""Prepacked / dequantized weights, built once per weight and reused on every call.

``qcompile::quantized_linear`` receives the canonical packed tensors (``formats/spec.py``) on
every call: repacking them for torch's CPU kernels, or dequantizing them, per call costs more
than the GEMM (measured: dequantizing a 2048x5632 int4 weight takes 2.4x a 256-token float32
GEMM, docs/benchmarks/cpu.md). So the derived tensors are cached:

- keyed on the identity of the weight's ``data`` tensor (``torch.utils.weak.WeakIdKeyDictionary``:
  no strong reference, an entry dies with its weight; a ``.to()`` or ``.float()`` makes new tensors,
  hence new entries);
- stamped with every source tensor's ``data_ptr``, ``_version``, dtype and shape, so an in-place
  update (``load_state_dict``, ``copy_``) rebuilds the entry on the next call;
- inference tensors carry no version counter, so their changes cannot be seen: they are not
  cached (a warning says so once) and every call rebuilds.

Dequantized float32 copies cost 4 bytes per weight; they are held up to a budget
(``QCOMPILE_CPU_DEQUANT_CACHE_MB``, default :data:`DEFAULT_DEQUANT_BUDGET_MB`), first come first
served, so that prefill on a large model does not silently quadruple its memory.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from qcompile.formats import QuantizedTensor

DEFAULT_DEQUANT_BUDGET_MB = 2048
"""Float32 copies of about 500M weights; the 2-layer 2048-wide Llama stack of docs/benchmarks/cpu.md needs 412 MiB."""

_BUDGET_ENV = "QCOMPILE_CPU_DEQUANT_CACHE_MB"
_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def dequant_budget_bytes() -> int:
    """The float32 cache budget in bytes, read from ``QCOMPILE_CPU_DEQUANT_CACHE_MB`` at each use."""
    text = os.environ.get(_BUDGET_ENV, str(DEFAULT_DEQUANT_BUDGET_MB))
    try:
        mb = float(text)
    except ValueError:
        raise ValueError(f"{_BUDGET_ENV} must be a number of MiB, got {text!r}") from None
    return int(max(mb, 0.0) * 2**20)


def _stamp(qt: QuantizedTensor) -> tuple | None:
    """What the entry was built from; None for inference tensors (no version counter)."""
    tensors = [t for t in (qt.data, qt.scale, qt.zero, qt.global_scale) if t is not None]
    if any(t.is_inference() for t in tensors):
        return None
    return (qt.spec, qt.shape, *((t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for t in tensors))


def cached(qt: QuantizedTensor, kind: str, build: Callable[[QuantizedTensor], Any]) -> Any:
    """``build(qt)``, computed once per (weight, kind) and rebuilt when a source tensor changes."""
    stamp = _stamp(qt)
    if stamp is None:
        _warn_once("inference", "qcompile: the quantized weights are inference tensors (made under "
                   "torch.inference_mode), whose in-place changes cannot be tracked: the CPU kernels repack "
                   "them on every call (slow); build or load the model outside inference_mode")
        return build(qt)
    entries = _cache.setdefault(qt.data, {})
    entry = entries.get(kind)
    if entry is not None and entry[0] == stamp:
        return entry[1]
    value = build(qt)
    entries[kind] = (stamp, value)
    return value


def dequant_cached_bytes() -> int:
    """Bytes held by live float32 dequantized copies."""
    return sum(entry[1].numel() * entry[1].element_size()
               for entries in _cache.values() for kind, entry in entries.items() if kind == "dequant")


def cached_dequantized(qt: QuantizedTensor, build: Callable[[QuantizedTensor], torch.Tensor]) -> torch.Tensor | None:
    """The cached float32 weight, or None when it is not cached and the budget has no room for it."""
    stamp = _stamp(qt)
    entries = _cache.get(qt.data, {}) if stamp is not None else {}
    entry = entries.get("dequant")
    if entry is not None and entry[0] == stamp:
        return entry[1]
    held = dequant_cached_bytes() - (entry[1].numel() * 4 if entry is not None else 0)
    if held + qt.shape[0] * qt.shape[1] * 4 > dequant_budget_bytes():
        return None
    return cached(qt, "dequant", build)


def clear() -> None:
    """Drop every cached tensor (tests, benchmarks)."""
    _cache.clear()
