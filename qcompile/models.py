"""Model sources: the builtin demo or a local Hugging Face model directory (what the CLI
compiles), and transformers architectures rebuilt from a saved config (what a standalone
artifact loads). Nothing is downloaded."""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch

from qcompile.demo import DEMO_NAME, load_minilm

BUILTINS = (DEMO_NAME,)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
"""A model directory holds its weights in one of these (sharded checkpoints through the index)."""


class ModelSourceError(ValueError):
    """A model source (directory or builtin name) cannot be used; the message names the path and what is wrong."""


def check_model_dir(source: str) -> Path:
    """``source`` as a model directory (or an ``.onnx`` file), or a :class:`ModelSourceError` that
    tells a missing path, a file, an empty directory, a directory without ``config.json`` or
    without weights apart."""
    path = Path(source)
    builtins = f"builtin models: {', '.join(BUILTINS)}"
    if path.suffix.lower() == ".onnx" and not path.is_dir():
        if not path.is_file():
            raise ModelSourceError(f"model {source!r}: no such ONNX file")
        return path
    if not path.exists():
        raise ModelSourceError(f"model {source!r}: no such directory (and not a builtin; {builtins})")
    if not path.is_dir():
        raise ModelSourceError(f"model {source!r} is a file; pass the directory that holds config.json")
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        raise ModelSourceError(f"model directory {source!r} is empty (expected config.json and the weights)")
    if "config.json" not in entries:
        shown = ", ".join(entries[:5]) + (", …" if len(entries) > 5 else "")
        raise ModelSourceError(f"model directory {source!r} has no config.json (it holds {shown})")
    if not any(name in entries for name in WEIGHT_FILES):
        raise ModelSourceError(f"model directory {source!r} has config.json but no weights "
                               f"(expected one of {', '.join(WEIGHT_FILES)})")
    return path


def architecture_of(config: Any, where: str) -> str:
    """The transformers class name a ``config.json`` dict names in ``architectures``."""
    if not isinstance(config, dict):
        raise ModelSourceError(f"{where} must hold a JSON object, got {type(config).__name__}")
    archs = config.get("architectures")
    if not archs:
        raise ModelSourceError(f"{where} names no \"architectures\": cannot tell which transformers class to build "
                               "(add e.g. \"architectures\": [\"LlamaForCausalLM\"])")
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ModelSourceError(f"{where}: \"architectures\" must be a list of class names, got {json.dumps(archs)[:80]}")
    return archs[0]


def model_class(name: str, where: str) -> type:
    """The transformers model class called ``name``: only a ``PreTrainedModel`` subclass that
    transformers itself exports, so an untrusted name cannot reach anything else."""
    import transformers

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ModelSourceError(f"{where}: {name!r} is not a transformers class name")
    try:
        cls = getattr(transformers, name)
    except (AttributeError, ImportError, RuntimeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ModelSourceError(f"{where}: transformers {transformers.__version__} has no model class {name!r}")
    return cls


def load_source(source: str, seq_len: int = 16, batch: int = 2) -> tuple[torch.nn.Module, tuple, dict]:
    """(model, example args, example kwargs) for a builtin name, a model directory or an ONNX file.

    A directory needs a ``config.json`` whose first ``architectures`` entry picks the
    transformers class. Examples come from its tokenizer if it has one, else random ids.
    An ``.onnx`` file is imported (``frontend/onnx_import.py``); its examples are built from the
    graph inputs (``OnnxModule.example_inputs``). Raises :class:`ModelSourceError` (before any
    weight is read) for an unusable source.
    """
    if source == DEMO_NAME:
        model, _, enc = load_minilm()
        return model, (), enc
    path = check_model_dir(source)
    if path.suffix.lower() == ".onnx" and path.is_file():
        from qcompile.frontend.onnx_import import OnnxImportError, import_onnx

        try:
            module = import_onnx(path)
        except OnnxImportError as e:
            raise ModelSourceError(str(e)) from None
        return module, (), module.example_inputs(batch=batch, seq=seq_len)
    import transformers

    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelSourceError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    cls = model_class(architecture_of(config, str(path / "config.json")), str(path / "config.json"))
    model = cls.from_pretrained(str(path)).eval()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        enc = tok(["qcompile traces this model with a short example sentence."] * batch, return_tensors="pt",
                  padding="max_length", max_length=seq_len, truncation=True)
        return model, (), {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    except (OSError, ValueError, TypeError):
        vocab = int(config.get("vocab_size", 1000))
        return model, (torch.randint(0, vocab, (batch, seq_len)),), {}


# ----------------------------------------------------------------------------- standalone artifacts
def transformers_description(model: torch.nn.Module) -> dict[str, Any] | None:
    """What rebuilding ``model``'s architecture needs without its checkpoint: the transformers
    class, constructor keywords that differ from the config's defaults, and the config as a
    JSON-able dict; ``None`` for a model that is not a transformers ``PreTrainedModel``."""
    transformers = sys.modules.get("transformers")  # a transformers model has imported it: never import it here
    if transformers is None:
        return None
    if not isinstance(model, transformers.PreTrainedModel) or getattr(transformers, type(model).__name__, None) is not type(model):
        return None
    init_kwargs: dict[str, Any] = {}
    params = inspect.signature(type(model).__init__).parameters
    if "add_pooling_layer" in params and getattr(model, "pooler", True) is None:
        init_kwargs["add_pooling_layer"] = False  # encoders built without their pooler (sentence embedders)
    return {"class": type(model).__name__, "init_kwargs": init_kwargs,
            "config": json.loads(model.config.to_json_string(use_diff=False))}


def build_from_config(class_name: str, config: dict[str, Any], init_kwargs: dict[str, Any], where: str) -> torch.nn.Module:
    """The architecture ``class_name`` for ``config`` with no checkpoint read and no weight
    initialisation run: parameters are zero-filled (the artifact's state replaces every one),
    buffers computed in the modules' constructors (rotary frequencies) are real."""
    from transformers.initialization import no_init_weights

    cls = model_class(class_name, where)
    config = {k: v for k, v in config.items() if k != "quantization_config"}  # describes the export, not the skeleton
    try:
        cfg = cls.config_class.from_dict(config)
    except (TypeError, ValueError, KeyError) as e:
        raise ModelSourceError(f"{where}: not a valid {cls.config_class.__name__}: {e}") from None
    try:
        with no_init_weights():
            model = cls._from_config(cfg, **init_kwargs)
    except TypeError as e:
        raise ModelSourceError(f"{where}: cannot build {class_name} with {init_kwargs}: {e}") from None
    model.tie_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model.eval()
