"""Choosing MiniLM's accuracy levers on a split of the calibration sentences, never on the test set.

    python benchmarks/minilm_tuning.py --list
    python benchmarks/minilm_tuning.py --configs gptq,gptq-mse,gptq-mse-float --out /tmp/tuning.jsonl

Protocol: the calibration sentences of ``benchmarks/data`` (``calibration_en.txt``,
``calibration_more_en.txt``, ``calibration_expository_en.txt``) are split: the last 64 sentences of
``calibration_more_en.txt`` are the validation set, the others (up to ``--train``, default all 672)
calibrate, each also joined with its neighbours into paragraphs of ``--paragraphs`` sentences
(``calibration_texts``; 0: sentences only). Score: mean cosine of mean-pooled embeddings against
float32 on the validation sentences and on paragraphs of 3 consecutive validation sentences (the
model is a sentence and short-paragraph encoder; longer inputs are harder). The held-out test
sentences of ``benchmarks/accuracy.py`` (the model README's) are never read here. Each configuration is a
recipe's formats plus a pass list; the results behind the recipes in ``qcompile/recipes.py`` are in
docs/gptq.md ("Choosing the options on MiniLM").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qcompile  # noqa: E402
from qcompile.demo import embedding_agreement, load_minilm, mean_pool  # noqa: E402
from qcompile.formats import QuantSpec  # noqa: E402
from qcompile.passes.gptq import GPTQ  # noqa: E402
from qcompile.passes.norm_folding import FoldNormScales  # noqa: E402
from qcompile.recipes import get_recipe  # noqa: E402

DATA = ROOT / "benchmarks" / "data"
VALIDATION = 64


def sentences(name: str) -> list[str]:
    return [s for s in (DATA / name).read_text().splitlines() if s.strip()]


def split() -> tuple[list[str], list[str]]:
    more = sentences("calibration_more_en.txt")
    train = sentences("calibration_en.txt") + more[:-VALIDATION] + sentences("calibration_expository_en.txt")
    return train, more[-VALIDATION:]


def paragraphs(texts: list[str], n: int) -> list[str]:
    """Consecutive runs of ``n`` sentences joined into one text (no overlap)."""
    return [" ".join(texts[i:i + n]) for i in range(0, len(texts) - n + 1, n)] if n > 1 else []


def _plain(**gptq):
    return lambda: ["canonicalize", "assign_quant_specs", GPTQ(**gptq), "lower"]


def _rotated(**gptq):
    return lambda: ["canonicalize", "assign_quant_specs", FoldNormScales(when="always"), "rotate_residual",
                    "rotate_online", GPTQ(**gptq), "lower"]


def _awq(**gptq):
    return lambda: ["canonicalize", "assign_quant_specs", "awq", GPTQ(**gptq), "lower"]


def _smoothed(quantizer):
    return lambda: ["canonicalize", "assign_quant_specs", "smooth_quant", quantizer(), "lower"]


W4 = get_recipe("w4a16")
W8A8 = get_recipe("w8a8")
W4_G64_SYM = replace(W4, name="w4a16-g64-sym", weight=QuantSpec("int4", group_size=64))
W4_G128_SYM = replace(W4, name="w4a16-g128-sym", weight=QuantSpec("int4", group_size=128))
CONFIGS = {
    "gptq": (W4, _plain(damp=0.1)),
    "gptq-mse-pairs": (W4, _plain(damp=0.1, grid="mse", grid_asym_pairs=True)),
    "gptq-mse": (W4, _plain(damp=0.1, grid="mse")),
    "gptq-hessian-pairs": (W4, _plain(damp=0.1, grid="hessian", grid_asym_pairs=True)),
    "g64sym-gptq": (W4_G64_SYM, _plain(damp=0.1)),
    "g64sym-gptq-mse": (W4_G64_SYM, _plain(damp=0.1, grid="mse")),
    "gptq-mse-float": (W4, _plain(damp=0.1, grid="mse", targets="float")),
    "gptq-mse-float-d0.03": (W4, _plain(damp=0.03, grid="mse", targets="float")),
    "gptq-mse-float-d0.3": (W4, _plain(damp=0.3, grid="mse", targets="float")),
    "g64sym-gptq-mse-float-d0.3": (W4_G64_SYM, _plain(damp=0.3, grid="mse", targets="float")),
    "g128sym-gptq-mse-float-d0.3": (W4_G128_SYM, _plain(damp=0.3, grid="mse", targets="float")),
    "gptq-mse-float-d1": (W4, _plain(damp=1.0, grid="mse", targets="float")),
    "gptq-float": (W4, _plain(damp=0.1, targets="float")),
    "gptq-mse-float-noact": (W4, _plain(damp=0.1, grid="mse", targets="float", act_order=False)),
    "rot-gptq": (W4, _rotated(damp=0.1)),
    "rot-gptq-mse": (W4, _rotated(damp=0.1, grid="mse")),
    "rot-gptq-mse-float": (W4, _rotated(damp=0.1, grid="mse", targets="float")),
    "rot-gptq-mse-float-d0.3": (W4, _rotated(damp=0.3, grid="mse", targets="float")),
    "gptq-mse-float-bias": (W4, _plain(damp=0.1, grid="mse", targets="float", bias_correction=True)),
    "rot-gptq-mse-float-bias": (W4, _rotated(damp=0.1, grid="mse", targets="float", bias_correction=True)),
    "awq-gptq-mse-float-d0.3": (W4, _awq(damp=0.3, grid="mse", targets="float")),
    "gptq-mse-float-d0.3-only-ffn-out": (W4.with_overrides({"*attention*": None, "*intermediate*": None}),
                                         _plain(damp=0.3, grid="mse", targets="float")),
    "gptq-mse-float-d0.3-only-ffn-in": (W4.with_overrides({"*attention*": None, "*.output.dense": None}),
                                        _plain(damp=0.3, grid="mse", targets="float")),
    "gptq-mse-float-d0.3-only-attention": (W4.with_overrides({"*intermediate*": None, "*layer.?.output.dense": None}),
                                           _plain(damp=0.3, grid="mse", targets="float")),
    "w8a8-smooth": (W8A8, _smoothed(lambda: "quantize_weights")),
    "w8a8-smooth-gptq": (W8A8, _smoothed(lambda: GPTQ(damp=0.1))),
    "w8a8-smooth-gptq-float": (W8A8, _smoothed(lambda: GPTQ(damp=0.1, targets="float"))),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--train", type=int, default=None, help="calibrate on the first N training sentences")
    ap.add_argument("--paragraphs", type=int, default=3, help="also calibrate on runs of N joined sentences (0: no)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--out", default=None, help="append one JSON line per configuration here")
    args = ap.parse_args()
    if args.list:
        print("\n".join(CONFIGS))
        return
    torch.manual_seed(0)
    model, tok, _ = load_minilm()
    train, val = split()
    train = train[:args.train] if args.train else train
    calibration = train + paragraphs(train, args.paragraphs)

    def enc(texts):
        e = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        return {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}

    trace = enc(train[:8])
    sets = {"sentences": enc(val), "paragraphs": enc(paragraphs(val, 3))}
    with torch.no_grad():
        refs = {k: mean_pool(model(**b).last_hidden_state, b["attention_mask"]) for k, b in sets.items()}
    for name in args.configs.split(","):
        recipe, passes = CONFIGS[name]
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cm = qcompile.compile(model, trace, recipe=recipe, passes=passes(), calibration=calibration, tokenizer=tok,
                                  progress=False, verify=False)
        row = {"config": name, "train_sentences": len(train), "calibration_texts": len(calibration)}
        with torch.no_grad():
            for key, batch in sets.items():
                m = embedding_agreement(refs[key], mean_pool(cm(**batch).last_hidden_state, batch["attention_mask"]))
                row[f"val_{key}_mean_cosine"] = round(m["mean_cosine"], 5)
                row[f"val_{key}_min_cosine"] = round(m["min_cosine"], 5)
        row["seconds"] = round(time.perf_counter() - start)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
