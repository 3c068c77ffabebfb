"""Model sources the CLI (and ``qcompile.load``) can build by name: the builtin
demo, or a local Hugging Face model directory. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qcompile.demo import DEMO_NAME, load_minilm

BUILTINS = (DEMO_NAME,)


def load_source(source: str, seq_len: int = 16, batch: int = 2) -> tuple[torch.nn.Module, tuple, dict]:
    """(model, example args, example kwargs) for a builtin name or a model directory.

    A directory needs a ``config.json``; its first ``architectures`` entry picks the
    transformers class. Examples come from its tokenizer if it has one, else random ids.
    """
    if source == DEMO_NAME:
        model, _, enc = load_minilm()
        return model, (), enc
    path = Path(source)
    if not (path / "config.json").exists():
        raise ValueError(f"{source!r} is neither a builtin ({', '.join(BUILTINS)}) nor a model directory with config.json")
    import transformers

    config = json.loads((path / "config.json").read_text())
    arch = (config.get("architectures") or ["AutoModel"])[0]
    cls = getattr(transformers, arch, None) or transformers.AutoModel
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
