"""CPU speed of the compiled model against float32: a Llama-shaped stack and the real MiniLM.

- Llama stack: ``transformers.LlamaModel`` from a ``LlamaConfig`` with random weights, 2 decoder
  layers, hidden 2048, intermediate 5632, 16 heads (4 KV heads), vocabulary 1024 (embeddings stay
  float; no LM head), one forward over 1, 16 and 256 tokens (batch 1, no KV cache).
- MiniLM: ``qcompile.demo.load_minilm`` (all-MiniLM-L6-v2), one sentence and the README batch.

Median of repeated forwards (float32 and the recipes in turns) under ``torch.inference_mode``, ``torch.set_num_threads(2)`` (as CI).
Also records which kernel each recipe's layers run (the report's ``kernel`` field). Writes
docs/benchmarks/cpu.md.

    python benchmarks/cpu.py [--repeats 5] [--out docs/benchmarks/cpu.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
import warnings
from functools import partial
from pathlib import Path

import torch

import qcompile
from qcompile.codegen.cpu import PACKED_MAX_M

RECIPES = ["w8a16", "w4a16", "w4a16-g32", "w8a8"]
TOKENS = (1, 16, 256)
THREADS = 2


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


def llama_stack() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=2, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=1024, max_position_embeddings=512, use_cache=False)
    return LlamaModel(config).eval()


CROSSOVER_M = (1, 4, 8, 12, 16, 24, 32, 64)


def crossover(repeats: int) -> str:
    """One linear per Llama shape: float32 vs the packed kernels by tokens (sets ``PACKED_MAX_M``)."""
    from qcompile.codegen.cpu import kernels
    from qcompile.formats import QuantSpec, quantize

    lines = ["| N × K | tokens | float32 ms | int8pack_mm ms | int8 split on int_mm (W8A16) ms | int4pack_mm g128 ms "
             "| int_mm (W8A8) ms |", "|---|---|---|---|---|---|---|"]
    for n, k in ((5632, 2048), (2048, 5632), (2048, 2048)):
        w = torch.randn(n, k)
        q8 = quantize(w, QuantSpec("int8"))
        p8 = kernels.pack_int8(q8)
        q4 = kernels.pack_int4(quantize(w, QuantSpec("int4", 128, symmetric=False)))
        act = QuantSpec("int8", dynamic=True)
        for m in CROSSOVER_M:
            x = torch.randn(m, k)
            t = interleaved_ms({
                "f32": partial(torch.nn.functional.linear, x, w), "i8": partial(kernels.int8pack_linear, x, q8.data, p8),
                "i8split": partial(kernels.int8_split_linear, x, q8), "i4": partial(kernels.int4pack_linear, x, q4), "mm": partial(kernels.int_mm_linear, x, q8, act)},
                repeats).values()
            lines.append(f"| {n} × {k} | {m} | " + " | ".join(f"{v:.3f}" for v in t) + " |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def kernels_of(cm) -> str:
    return "; ".join(sorted({layer.kernel for layer in cm.report().layers}))


def interleaved_ms(fns: dict[str, object], repeats: int) -> dict[str, float]:
    """Median ms of each callable, run in turns (a shared machine's load hits all of them alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()  # warm-up: builds the packed / dequantized caches
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def bench_model(name: str, model: torch.nn.Module, example: dict, cases: dict[str, dict],
                repeats: int) -> tuple[list[dict], dict[str, str]]:
    compiled = {}
    for recipe in RECIPES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled[recipe] = qcompile.compile(model, example, target="cpu", recipe=recipe, progress=False,
                                                verify=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = qcompile.compile(model, example, target="cpu", recipe="w8a16", overrides={"*": None}, progress=False,
                                 verify=False)
    rows = []
    for case, inputs in cases.items():
        fns = {"float32": partial(model, **inputs), "graph": partial(graph, **inputs),
               **{r: partial(cm, **inputs) for r, cm in compiled.items()}}
        rows.append({"model": name, "case": case, **interleaved_ms(fns, repeats)})
        print(rows[-1], flush=True)
    return rows, {recipe: kernels_of(cm) for recipe, cm in compiled.items()}


def markdown(rows: list[dict], kernels: dict[str, dict[str, str]], cross: str, repeats: int, load: str) -> str:
    head = ("| model | tokens | float32 ms | exported graph, all float, ms | "
            + " | ".join(f"{r} ms (× float)" for r in RECIPES) + " |")
    lines = [head, "|" + "---|" * (4 + len(RECIPES))]
    slower = []
    for row in rows:
        cells = []
        for r in RECIPES:
            speedup = row["float32"] / row[r]
            cells.append(f"{row[r]:.1f} ({speedup:.2f}×)")
            if speedup < 1.0:
                slower.append(f"{r} on {row['model']} at {row['case']}: {speedup:.2f}× of float32")
        lines.append(f"| {row['model']} | {row['case']} | {row['float32']:.1f} | {row['graph']:.1f} | "
                     + " | ".join(cells) + " |")
    kern = ["| model | recipe | kernel |", "|---|---|---|"]
    for model, by_recipe in kernels.items():
        kern += [f"| {model} | {r} | {k} |" for r, k in by_recipe.items()]
    return "\n".join([
        "# CPU speed: compiled vs float32",
        "",
        f"Measured 2026-12-01 by `benchmarks/cpu.py` on {cpu_model()} ({len(os.sched_getaffinity(0))} of them "
        f"available to the process), torch {torch.__version__}, "
        f"{THREADS} torch threads (as CI), median of {repeats} forwards under `torch.inference_mode` "
        "after one warm-up forward (which builds the prepacked / dequantized weights); float32 and the "
        "recipes run in turns, so that the load of this shared machine (load average "
        f"{load}) hits them alike.",
        "",
        "Models: a Llama-shaped stack (`transformers.LlamaModel`, random weights, 2 decoder layers, hidden 2048, "
        "intermediate 5632, 16 heads / 4 KV heads, vocabulary 1024, no LM head; one forward over the tokens, "
        "batch 1, no KV cache) and the real all-MiniLM-L6-v2 (`qcompile.demo.load_minilm`: its first README sentence unpadded, "
        "and the whole padded README batch). Times are whole forwards, attention and norms included; `× float` is "
        "against the eager float32 model, above 1 is faster. The exported-graph column is the compiled model with "
        "every layer kept float (`overrides={'*': None}`): what the graph alone costs.",
        "",
        *lines,
        "",
        "Kernels (the report's per-layer `kernel`; `M` = tokens per call, "
        f"`qcompile.codegen.cpu.PACKED_MAX_M` = {PACKED_MAX_M}):",
        "",
        *kern,
        "",
        "Slower than float32: " + ("; ".join(slower) if slower else "nowhere in this table") + ".",
        "",
        "## One linear: where the packed kernels stop paying",
        "",
        "The kernels alone (`qcompile.codegen.cpu.kernels`, weights prepacked; float32 in, float32 out), "
        "per Llama linear shape, by tokens. This sets `PACKED_MAX_M`: above it int4 weight-only layers run a "
        "float32 GEMM on the cached dequantized weight instead. int8 weight-only layers run `int8pack_mm` up to "
        "`INT8PACK_MAX_M` tokens and the split kernel (x as two int8 terms, one `torch._int_mm`, float32 precision) "
        "above.",
        "",
        cross,
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/cpu.md"))
    parser.add_argument("--models", default="llama,minilm", help="comma-separated subset of llama,minilm")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    start_load = f"{os.getloadavg()[0]:.1f}"
    cross = crossover(args.repeats * 4)

    models = set(args.models.split(","))
    rows, kernels = [], {}
    if "llama" in models:
        llama = llama_stack()
        ids = {m: {"input_ids": torch.randint(0, 1024, (1, m))} for m in TOKENS}
        got, kernels["Llama stack 2048"] = bench_model("Llama stack 2048", llama, ids[16],
                                                       {f"{m} tok": ids[m] for m in TOKENS}, args.repeats)
        rows += got
        del llama
    if "minilm" in models:
        from qcompile.demo import load_minilm

        minilm, _, batch = load_minilm()
        n, s = batch["input_ids"].shape
        length = int(batch["attention_mask"][0].sum())
        one = {k: v[:1, :length] for k, v in batch.items()}  # the first sentence, unpadded
        got, kernels["MiniLM"] = bench_model("MiniLM", minilm, batch, {f"1 sentence, {length} tok": one,
                                                                      f"{n} sentences × {s} tok": batch}, args.repeats)
        rows += got
    load = f"{start_load} at the start, {os.getloadavg()[0]:.1f} at the end"
    text = markdown(rows, kernels, cross, args.repeats, load)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
