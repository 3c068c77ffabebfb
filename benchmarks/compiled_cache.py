"""Compiled models shared between benchmark scripts, so that a recipe compiled once (GPTQ fitted to the
float model takes minutes on MiniLM) serves ``accuracy.py`` and ``onnx_ort.py`` alike.

    cm = compile_cached(cache_dir, model, example, recipe="w4a16-gptq-fit", calibration=texts, tokenizer=tok)

An entry is a ``qcompile.save`` artifact under ``cache_dir``, named by a hash of everything the result
depends on: the recipe (its full ``to_dict``), the calibration (texts or tensors), the model's class and
parameters, and every source file of the ``qcompile`` package, so that a code change never serves a
stale model. ``cache_dir=None`` compiles every time.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

import qcompile

PACKAGE = Path(qcompile.__file__).resolve().parent


def _digest(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        h.update(str((value.dtype, tuple(value.shape))).encode())
        h.update(value.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        for key in sorted(value):
            h.update(str(key).encode())
            _digest(h, value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            _digest(h, item)
    else:
        h.update(repr(value).encode())


def cache_key(model: torch.nn.Module, recipe: str | qcompile.Recipe, calibration: Any) -> str:
    """Hash of the recipe, the calibration, the model's weights and the qcompile sources."""
    h = hashlib.sha256()
    h.update(json.dumps(qcompile.get_recipe(recipe).to_dict(), sort_keys=True, default=str).encode())
    _digest(h, calibration)
    h.update(type(model).__qualname__.encode())
    _digest(h, dict(model.state_dict()))
    for path in sorted(PACKAGE.rglob("*.py")):
        h.update(path.relative_to(PACKAGE).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:20]


def compile_cached(cache_dir: Path | None, model: torch.nn.Module, example: Any, *, recipe: str | qcompile.Recipe,
                   calibration: Any, **compile_kwargs: Any) -> qcompile.CompiledModel:
    """``qcompile.compile(model, example, recipe=recipe, calibration=calibration, **compile_kwargs)``, or the
    artifact an earlier identical call saved under ``cache_dir``."""
    if cache_dir is None:
        return qcompile.compile(model, example, recipe=recipe, calibration=calibration, **compile_kwargs)
    name = qcompile.get_recipe(recipe).name
    path = Path(cache_dir) / f"{name}-{cache_key(model, recipe, calibration)}"
    if (path / "manifest.json").exists():
        print(f"  {name}: compiled model from {path}", flush=True)
        return qcompile.load(path, model, example)
    cm = qcompile.compile(model, example, recipe=recipe, calibration=calibration, **compile_kwargs)
    cm.save(path)
    return cm
