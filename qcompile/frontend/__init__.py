"""Frontends: models in, canonical FX graphs out."""

from qcompile.frontend.canonicalize import Canonicalize
from qcompile.frontend.torch_export import ExportedModel, ExportError, export_model

__all__ = ["Canonicalize", "ExportError", "ExportedModel", "export_model"]
