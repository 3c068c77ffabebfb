"""Mixed precision on the real all-MiniLM-L6-v2 (CPU): budgets and a quality floor over rotated,
GPTQ-fitted options, uniform recipes of the same size, and which sensitivity proxy predicts the
end-to-end error best.

    OMP_NUM_THREADS=1 python benchmarks/mixed_precision.py   # -> docs/benchmarks/mixed-precision-minilm.md (+ .png)
    python benchmarks/mixed_precision.py --quick --no-write   # a smoke run: 1 calibration batch, 2 rows

Protocol (benchmarks/accuracy.py's): calibrate on sentences of ``benchmarks/data/calibration_*.txt``
(evenly spaced, ``--sentences`` of them, all 736 by default: accuracy.py's 981 texts less its
paragraphs, so that the run stays under 40 minutes on one CPU thread), test on the model README's
26 prose sentences, never calibrated on. Metric: mean-pooled sentence embeddings against float32 (mean and min cosine).
Pipeline: ``w4a16-rotate-gptq-fit`` (online Hadamards, GPTQ on error-minimising grids fitted to the
float model) for the mixed rows and the uniform int3 rows; the mixed rows choose among
``CANDIDATES`` per layer. The Hessians and the final GPTQ see every calibration sentence; the model
proxy (one forward per layer and option) and the quality rounds run on the first ``PROXY_BATCHES``
batches (the pass's ``proxy_batches``); the mixed rows share one sensitivity measurement through
the pass's ``cache``. Bits per weight: every stored byte of the quantized linears (codes, scales,
zero points) over their weights, 16 for a layer kept 16-bit (the budget's count). The proxies'
correlations are over random mixed assignments, measured end to end on the proxy batches
(relative squared error of the last hidden state).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy import CALIBRATION_FILES, _environment, calibration_sentences  # noqa: E402

import qcompile  # noqa: E402
from qcompile.demo import embedding_agreement, load_minilm, mean_pool, readme_sentences  # noqa: E402
from qcompile.formats import QuantSpec  # noqa: E402

CALIBRATION_SENTENCES = 736
"""Every calibration sentence (23 batches; accuracy.py adds 245 paragraphs of them): the Hessians
and GPTQ see all of them, the model proxy the first ``PROXY_BATCHES``."""
BATCH = 32
PROXY_BATCHES = 1
"""The model proxy's forwards (8 quantized options × 36 layers, and the checks) run on one batch."""
OUT = ROOT / "docs" / "benchmarks" / "mixed-precision-minilm.md"
CORRELATION_ASSIGNMENTS = 24
PIPELINE = "w4a16-rotate-gptq-fit"
CANDIDATES = ["int8", "int4-g128-asym", "int4-g64-asym", "int4-g32-asym", "int3-g128-asym", "int3-g64-asym",
              "int3-g32-asym", "int2-g32-asym", None]
"""The default candidates plus int3 g128 (the uniform 3-bit recipe's format, 3.19 bits)."""


def _bits(cm: qcompile.CompiledModel) -> float:
    """Stored bits per weight of the decided linears, 16 for a layer kept 16-bit (not excluded ones)."""
    layers = [la for la in cm.report().layers if la.method != "kept float" or "mixed_precision" in la.passes]
    stored = sum(la.bytes_after if la.method != "kept float" else la.bytes_fp16 for la in layers)
    return 8.0 * stored / sum(la.bytes_fp16 / 2 for la in layers)


def _uniform(spec: str) -> qcompile.Recipe:
    """``PIPELINE`` with every quantized layer at ``spec``."""
    base = qcompile.get_recipe(PIPELINE)
    return replace(base, name=f"{PIPELINE} {spec}", description=f"{spec} weights, {PIPELINE}'s pipeline",
                   weight=QuantSpec.parse(spec))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two rows, no correlations (a smoke run)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--sentences", type=int, default=CALIBRATION_SENTENCES, help="calibration sentences")
    args = parser.parse_args()
    run_start = time.perf_counter()
    model, tok, _ = load_minilm()
    test_text = readme_sentences()
    pool = calibration_sentences(CALIBRATION_FILES)
    n = BATCH if args.quick else args.sentences
    calib_text = [pool[i * len(pool) // n] for i in range(min(n, len(pool)))]  # evenly spaced over the files
    assert not set(test_text) & set(calib_text)

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    calibration = [encode(calib_text[i:i + BATCH]) for i in range(0, len(calib_text), BATCH)]
    test = encode(test_text)
    with torch.no_grad():
        ref = mean_pool(model(**test).last_hidden_state, test["attention_mask"])

    rows: list[tuple[str, str, object, dict]] = [
        ("uniform", f"{PIPELINE} (int4 g128 asym)", PIPELINE, {}),
        ("mixed", "budget bits ≤ 4.25", PIPELINE, {"budget": {"bits": 4.25}}),
    ]
    if not args.quick:
        rows = [
            ("uniform", "w8a16 (int8 per channel, RTN)", "w8a16", {}),
            ("uniform", "w4a16-gptq-fit (int4 g128 asym, no rotation)", "w4a16-gptq-fit", {}),
            *rows,
            ("uniform", f"{PIPELINE} int3 g128 asym", _uniform("int3-g128-asym"), {}),
            ("uniform", f"{PIPELINE} int3 g64 asym", _uniform("int3-g64-asym"), {}),
            ("mixed", "budget bits ≤ 3.25", PIPELINE, {"budget": {"bits": 3.25}}),
            ("mixed", "quality cosine ≥ 0.995", PIPELINE, {"quality": {"cosine": 0.995}}),
        ]
    results = []
    first_mixed = True
    cache: dict = {}
    for kind, label, recipe, mp in rows:
        options: dict = {}
        if kind == "mixed":
            options = {"mixed_precision": {"correlation_assignments": CORRELATION_ASSIGNMENTS if first_mixed and not
                                           args.quick else 0, "cache": cache, "candidates": CANDIDATES,
                                           "proxy_batches": PROXY_BATCHES}, **mp}
            first_mixed = False
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cm = qcompile.compile(model, calibration[0], recipe=recipe, calibration=calibration, progress=False,
                                  verify=False, **options)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            emb = mean_pool(cm(**test).last_hidden_state, test["attention_mask"])
        score = embedding_agreement(ref, emb)
        rec = cm.report().mixed_precision
        results.append({"kind": kind, "label": label, "bits": _bits(cm), "mean": score["mean_cosine"],
                        "min": score["min_cosine"], "seconds": seconds, "record": rec, "cm": cm})
        print(f"{label:50s} {results[-1]['bits']:.3f} b/w  held-out mean cosine {score['mean_cosine']:.5f}  "
              f"min {score['min_cosine']:.5f}  {seconds:.0f} s", flush=True)
        if rec and "correlations" in rec:
            for c in rec["correlations"]:
                print(f"  proxy {c['proxy']:8s} Spearman {c['spearman']:.3f}  Pearson {c['pearson']:.3f}")
    total = time.perf_counter() - run_start
    print(f"whole run {total:.0f} s", flush=True)
    if args.no_write:
        return
    _write(results, len(calib_text), len(test_text), total)


def _write(results: list[dict], n_calib: int, n_test: int, total: float) -> None:
    lines = ["# Mixed precision on all-MiniLM-L6-v2 (CPU)", "",
             f"Generated by `OMP_NUM_THREADS=1 python benchmarks/mixed_precision.py` on {_environment()}; the whole "
             f"run took {total / 60:.0f} minutes. Calibration: {n_calib} sentences of `benchmarks/data/calibration_*.txt` "
             f"(evenly spaced) in batches of {BATCH}; the model proxy and the quality rounds on the first {PROXY_BATCHES} "
             f"batch ({PROXY_BATCHES * BATCH} sentences); test: the README's {n_test} prose sentences (disjoint). "
             f"Mixed rows: `{PIPELINE}`'s pipeline (online Hadamards, GPTQ fitted to the float model on searched "
             "grids), candidates " + ", ".join(c or "16-bit" for c in CANDIDATES) + ", proxy `model`, Q/K/V tied. "
             "Bits per weight: stored bytes of the 36 encoder linears over their weights (scales and zero points "
             "included; 16 for a layer kept 16-bit).", "",
             "| kind | what | bits/weight | held-out mean cosine | min cosine | compile s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['kind']} | {r['label']} | {r['bits']:.3f} | {r['mean']:.5f} | {r['min']:.5f} | "
                     f"{r['seconds']:.0f} |")
    for r in results:
        rec = r["record"]
        if not rec:
            continue
        lines += ["", f"## {r['label']}", "",
                  f"Predicted output error {rec['predicted_error']:.3e}, measured {rec['measured_error']:.3e} (cosine "
                  f"{rec['measured_cosine']:.5f} on the calibration set, last hidden state flattened); "
                  f"{rec['forwards']} calibration forwards, {rec['seconds']['total']:.0f} s in the pass"
                  + (" (sensitivities from the shared cache)." if rec.get("sensitivity_cached") else
                     f", {rec['seconds']['sensitivity']:.0f} s of them measuring sensitivities.")]
        if "correlations" in rec:
            lines += ["", f"Proxies against the measured end-to-end error over {rec['correlations'][0]['assignments']} "
                          "random assignments (calibration set):", "", "| proxy | Spearman | Pearson |", "|---|---:|---:|"]
            lines += [f"| {c['proxy']} | {c['spearman']:.3f} | {c['pearson']:.3f} |" for c in rec["correlations"]]
        if rec.get("iterations"):
            lines += ["", "| round | error bound | bits | predicted | measured cosine | meets |", "|---:|---:|---:|---:|---:|---|"]
            for i, it in enumerate(rec["iterations"], 1):
                if "note" in it:
                    lines.append(f"| {i} | {it['note']} | | | | |")
                else:
                    lines.append(f"| {i} | {it['error_bound']:.3e} | {it['bits']:.3f} | {it['predicted_error']:.3e} | "
                                 f"{it['measured_cosine']:.5f} | {'yes' if it['meets_floor'] else 'no'} |")
        counts: dict[str, int] = {}
        for option in rec["choice"].values():
            counts[option] = counts.get(option, 0) + 1
        lines += ["", "Chosen options: " + ", ".join(f"{k} × {v}" for k, v in sorted(counts.items()))]
    lines += ["", *_targets(results)]
    png = OUT.with_suffix(".png")
    plotted = next((r for r in results if r["record"] and r["label"] == "budget bits ≤ 4.25"), None)
    if plotted is not None:
        try:
            plotted["cm"].report().plot(png)
            lines += ["", f"![error–size front, budget 4.25 bits]({png.name})"]
        except ImportError as e:
            print(f"no plot: {e}")
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


TARGETS = {"budget bits ≤ 4.25": (4.25, 0.995), "budget bits ≤ 3.25": (3.25, 0.97)}
"""The issue's targets: a budget row's bits and the held-out mean cosine it must reach."""


def _targets(results: list[dict]) -> list[str]:
    """Met / missed against the issue's targets, from this run's rows."""
    lines = ["## Against the issue's targets", ""]
    for r in results:
        if r["label"] in TARGETS:
            bits, floor = TARGETS[r["label"]]
            uniform = [u for u in results if u["kind"] == "uniform" and u["bits"] <= bits]
            best = max(uniform, key=lambda u: u["mean"], default=None)
            beaten = "" if best is None else (
                f"; the best uniform recipe of at most {bits} bits in this run, {best['label']} ({best['bits']:.3f} "
                f"bits, {best['mean']:.5f}), is {'beaten' if r['mean'] > best['mean'] else 'not beaten'}")
            lines.append(f"- ≤ {bits} bits, mean cosine ≥ {floor}: {r['mean']:.5f} at {r['bits']:.3f} bits, "
                         f"**{'met' if r['mean'] >= floor else 'missed'}**{beaten}.")
        elif r["label"].startswith("quality cosine"):
            floor = float(r["label"].split("≥")[1])
            lines.append(f"- quality cosine ≥ {floor} within 0.002 on the held-out sentences: {r['mean']:.5f} at "
                         f"{r['bits']:.3f} bits, **{'met' if r['mean'] >= floor - 0.002 else 'missed'}**.")
    return lines


if __name__ == "__main__":
    main()
