"""ONNX files of test models, exported by torch.onnx (dynamo or TorchScript) with dynamic batch and
sequence, and token inputs for them: shared by the importer's and the exporter's tests."""

from __future__ import annotations

import contextlib
import io
import warnings

import torch

from tests.tiny_models import VOCAB


def token_inputs(batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[0, -2:] = 0  # padding exercises the attention-mask subgraph
    return {"input_ids": ids, "attention_mask": mask}


def export_onnx_file(model: torch.nn.Module, inputs: dict, path, dynamo: bool = True, opset: int | None = None) -> str:
    """``model(**inputs)`` exported by torch.onnx with dynamic batch and sequence."""
    causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    pinned = {"use_cache": False} if causal else {}  # a DynamicCache output cannot be exported
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
            spec = {k: {0: batch, 1: seq} for k in inputs} | {k: None for k in pinned}
            torch.onnx.export(model, (), str(path), kwargs={**inputs, **pinned}, dynamo=True, dynamic_shapes=spec)
        else:  # the TorchScript exporter traces positional arguments: bind them by name for transformers
            names = list(inputs)
            forward = type(model).forward
            model.forward = lambda *args: forward(model, **dict(zip(names, args)), **pinned, return_dict=False)[0]
            try:
                torch.onnx.export(model, tuple(inputs.values()), str(path), dynamo=False, input_names=names,
                                  output_names=["out"], dynamic_axes={k: {0: "batch", 1: "seq"} for k in names},
                                  opset_version=opset or 17)
            finally:
                del model.forward
    return str(path)
