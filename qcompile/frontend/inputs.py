"""Example inputs as users pass them → the ``(args, kwargs)`` pair the frontend traces with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def split_inputs(example_inputs: Any, example_kwargs: Mapping | None) -> tuple[tuple, dict]:
    """A tensor, a tuple/list of positional arguments, or a dict of keyword arguments (a
    tokenizer's output works), plus optional extra keyword arguments."""
    kwargs = dict(example_kwargs or {})
    if isinstance(example_inputs, Mapping):
        return (), {**dict(example_inputs), **kwargs}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), kwargs
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        return tuple(example_inputs), kwargs
    raise TypeError(f"example_inputs must be a tensor, a tuple of arguments or a dict of keyword arguments, "
                    f"got {type(example_inputs).__name__}")
