"""ONNX Runtime on CPU: float32 ONNX, ONNX Runtime's own quantizers and qcompile's exports, one run.

    python benchmarks/onnx_ort.py                            # MiniLM + the Llama-shaped decoder, every row
    python benchmarks/onnx_ort.py --models minilm --repeats 10 --json /tmp/ort.json
    python benchmarks/onnx_ort.py --write                    # also write docs/benchmarks/onnx-ort-cpu.md

Models:
- all-MiniLM-L6-v2 (``qcompile.demo.load_minilm``), ``last_hidden_state`` of ``(input_ids, attention_mask)``.
  Accuracy: mean-pooled embeddings of the model README's held-out sentences against torch float32
  (mean cosine, as ``benchmarks/accuracy.py``). Latency: the first held-out sentence alone, and the
  whole padded held-out batch.
- A Llama-shaped decoder, ``LlamaForCausalLM`` from a ``LlamaConfig`` with random weights (seed 0):
  hidden 1024, 4 layers, intermediate 2816, 16 heads / 4 KV heads, vocabulary 32000 (about 117M
  parameters; exported and quantized in seconds to a minute here), logits of ``input_ids``, no KV
  cache. Accuracy: logits cosine against torch float32 per token (mean), on random token batches.
  Latency: a 128-token prefill and a 1-token forward, batch 1. With ``use_cache=False`` the
  "1-token step" is a forward of a length-1 sequence, not a decode step that reads a KV cache.

Every model is exported to float32 ONNX with ``torch.onnx.export(dynamo=True)`` (batch and
sequence dynamic). ONNX Runtime's quantizers then run on that file: ``MatMulNBitsQuantizer`` with
its default algorithm (block 128, symmetric and asymmetric; and 8 bits, symmetric, the peer of
int8 weight-only) and its HQQ option (block 128), and ``quantize_dynamic`` int8 per channel (W8A8,
dynamic activations). qcompile's rows compile the torch
model with a recipe and write it with ``qcompile.export_onnx(cm, example_inputs, path,
target="ort-cpu")``; a checkout without that function says so and runs the rest.

Per row: file size (the ``.onnx`` and its external data), bits per weight of the quantized matrix
products as stored in the file (codes, scales and zero points over their weights; ``MatMulNBits``
takes scales in the activations' dtype, float32 here, so int4 g128 is 4.25 bits symmetric and
4.28 asymmetric in the file where ``benchmarks/accuracy.py`` counts fp16 scales, 4.13 and 4.19; ``MatMulInteger`` weights count one
float32 scale per output channel; the float file counts its ``MatMul``/``Gemm`` weights at 32),
ONNX Runtime latency (CPU execution provider, ``SessionOptions.intra_op_num_threads = 2``,
``inter_op_num_threads = 1``; warm-up runs, then the median of ``--repeats`` runs, every file's
session run in turns so that a shared machine's load hits them alike), and accuracy. ONNX
Runtime's quantizers quantize every ``MatMul`` with a weight initializer, the LM head included;
qcompile's recipes keep the LM head and the embeddings float, and ``quantize_dynamic`` also
quantizes the embedding ``Gather`` (per tensor, uint8): the file sizes show the difference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compiled_cache import compile_cached  # noqa: E402  (benchmarks/, on sys.path as the script's directory)

import qcompile  # noqa: E402

THREADS = 2
SPIN = False
"""ONNX Runtime's intra-op threads spin after each run by default; with the files' sessions timed in
turns, the spinning threads of the session that just ran steal the cores from the next one (measured on
MiniLM W8A8, 13 sessions in turns: one-sentence ratios to ``quantize_dynamic`` moved between 1.0x and
1.5x from run to run). Off for every session alike (``--spin`` turns it back on)."""
WARMUPS = 3

# ------------------------------------------------------------------ qcompile's exports (plug-in point)
# The recipes whose ONNX exports are measured next to ONNX Runtime's own files; each row is
# written by ``qcompile.export_onnx`` (see ``qcompile_rows``). A recipe that does not export gets a
# row with the exporter's error, the rest still run.
QCOMPILE_RECIPES = {
    "minilm": ("w4a16-gptq-fit", "w4a16-rotate-gptq-fit", "w4a16-sym-rotate-gptq-fit", "w4a16", "w8a16",
               "w8a8-smooth", "w8a8-pt-smooth"),
    "decoder": ("w4a16-gptq-fit", "w4a16-gptq-fit+head", "w4a16-sym-rotate-gptq-fit", "w4a16", "w4a16+head", "w8a16",
                "w8a8-smooth", "w8a8-pt-smooth", "w8a8-pt-smooth+head"),
}
QCOMPILE_SAME_KIND = {"w4a16": "int4", "w8a16": "int8 weight-only", "w8a8": "int8 W8A8"}
"""What each recipe family is compared with (the rows' ``kind``)."""


def qcompile_recipe(name: str) -> str | qcompile.Recipe:
    """``recipe[+head]``: ``+head`` quantizes the LM head too, with the recipe's weight format, as ONNX
    Runtime's ``MatMulNBits`` quantizer does (qcompile's recipes keep it 16-bit)."""
    base, _, flag = name.partition("+")
    if not flag:
        return base
    if flag != "head":
        raise SystemExit(f"recipe {name!r}: unknown flag +{flag} (known: +head)")
    recipe = qcompile.get_recipe(base)
    return replace(recipe.with_overrides({"lm_head": recipe.weight}), name=name)


@dataclass
class Model:
    """One benchmarked model: the torch module (as qcompile compiles it), the export wrapper, inputs."""

    name: str
    torch_model: torch.nn.Module
    wrapper: torch.nn.Module
    input_names: tuple[str, ...]
    example: dict[str, torch.Tensor]
    dynamic_shapes: dict[str, dict[int, Any]]
    latency_feeds: dict[str, dict[str, torch.Tensor]]
    accuracy_feeds: dict[str, torch.Tensor]
    score: Callable[[torch.Tensor], dict[str, float]]
    """ONNX Runtime's first output on ``accuracy_feeds`` → accuracy metrics."""
    calibration: Any
    tokenizer: Any = None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- models
class _Hidden(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def minilm() -> Model:
    from qcompile.demo import load_minilm, mean_pool, readme_sentences

    model, tok, _ = load_minilm()
    held_out = readme_sentences()
    from benchmarks.accuracy import CALIBRATION_FILES, calibration_sentences, calibration_texts

    sentences = calibration_sentences(CALIBRATION_FILES)
    assert not set(held_out) & set(sentences)
    calib = calibration_texts(sentences)  # the calibration of benchmarks/accuracy.py

    def enc(texts: list[str]) -> dict[str, torch.Tensor]:
        e = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        return {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}

    batch = enc(held_out)
    with torch.no_grad():
        ref = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])

    def score(hidden: torch.Tensor) -> dict[str, float]:
        emb = mean_pool(hidden.float(), batch["attention_mask"])
        cos = torch.nn.functional.cosine_similarity(ref.double(), emb.double(), dim=1)
        return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}

    seq = torch.export.Dim("sequence", min=2, max=512)
    batch_dim = torch.export.Dim("batch", min=1, max=1024)
    one = enc(held_out[:1])
    return Model("all-MiniLM-L6-v2", model, _Hidden(model).eval(), ("input_ids", "attention_mask"), enc(calib[:8]),
                 {"input_ids": {0: batch_dim, 1: seq}, "attention_mask": {0: batch_dim, 1: seq}},
                 {f"1 sentence ({one['input_ids'].shape[1]} tokens)": one,
                  f"batch of {len(held_out)} ({batch['input_ids'].shape[1]} tokens padded)": batch},
                 batch, score, calib, tok,
                 [f"accuracy: {len(held_out)} held-out README sentences; calibration (qcompile's rows): the "
                  f"{len(sentences)} sentences of benchmarks/data and their 3-sentence paragraphs, {len(calib)} "
                  "texts (as benchmarks/accuracy.py)"])


DECODER_CONFIG = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)


def decoder() -> Model:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**DECODER_CONFIG, use_cache=False, tie_word_embeddings=False)).eval()
    g = torch.Generator().manual_seed(1)
    vocab = DECODER_CONFIG["vocab_size"]
    accuracy_ids = torch.randint(0, vocab, (4, 64), generator=g)
    calibration = [torch.randint(0, vocab, (4, 128), generator=g) for _ in range(8)]
    with torch.no_grad():
        ref = model(input_ids=accuracy_ids, use_cache=False).logits

    def score(logits: torch.Tensor) -> dict[str, float]:
        cos = torch.nn.functional.cosine_similarity(ref.double().flatten(0, 1), logits.double().flatten(0, 1), dim=1)
        return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}

    seq = torch.export.Dim("sequence", min=1, max=2048)
    batch_dim = torch.export.Dim("batch", min=1, max=256)
    params = sum(p.numel() for p in model.parameters())
    return Model("Llama-shaped decoder", model, _Logits(model).eval(), ("input_ids",),
                 {"input_ids": torch.randint(0, vocab, (2, 16), generator=g)}, {"input_ids": {0: batch_dim, 1: seq}},
                 {"prefill 128 tokens": {"input_ids": torch.randint(0, vocab, (1, 128), generator=g)},
                  "1-token forward (no KV cache)": {"input_ids": torch.randint(0, vocab, (1, 1), generator=g)}},
                 {"input_ids": accuracy_ids}, score, calibration, None,
                 [f"LlamaForCausalLM, random weights: {', '.join(f'{k} {v}' for k, v in DECODER_CONFIG.items())}; "
                  f"{params / 1e6:.0f}M parameters; accuracy: logits of 4 × 64 random tokens; calibration: 8 × 4 × 128 "
                  "other random tokens"])


# ----------------------------------------------------------------------------- files
def export_float(m: Model, path: Path) -> float:
    """``torch.onnx.export(dynamo=True)`` of the float model; returns the seconds it took."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(m.wrapper, (), kwargs=dict(m.example), dynamo=True,
                                    dynamic_shapes=m.dynamic_shapes, input_names=list(m.input_names),
                                    output_names=["output"], verbose=False)
    _remove_stale(path)
    program.save(str(path))
    return time.perf_counter() - start


def _remove_stale(path: Path) -> None:
    """An ONNX file and its external data from an earlier run (``--keep``): onnx appends external data
    to an existing ``.data`` file, which would inflate the measured size."""
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)


def ort_quantized(fp32: Path, out: Path) -> list[tuple[str, str, Path, float]]:
    """ONNX Runtime's own quantizers on the float file: ``(label, kind, path, seconds)``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    for name in ("onnxruntime.quantization", ""):  # quantize_dynamic logs every tensor at INFO on the root logger
        logging.getLogger(name).setLevel(logging.WARNING)
    files = []
    configs = [("MatMulNBits default, block 128, symmetric", "nbits_sym.onnx",
                DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True)),
               ("MatMulNBits default, block 128, asymmetric", "nbits_asym.onnx",
                DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=False)),
               ("MatMulNBits HQQ, block 128", "nbits_hqq.onnx", HQQWeightOnlyQuantConfig(block_size=128)),
               ("MatMulNBits default, 8 bits, block 128, symmetric", "nbits8_sym.onnx",
                DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True, bits=8))]
    for label, name, config in configs:
        start = time.perf_counter()
        q = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=config.bits, algo_config=config)
        q.process()
        _remove_stale(out / name)
        q.model.save_model_to_file(str(out / name), True)
        kind = "int4" if config.bits == 4 else "int8 weight-only"
        files.append((label, kind, out / name, time.perf_counter() - start))
    start = time.perf_counter()
    _remove_stale(out / "dynamic_int8.onnx")
    quantize_dynamic(str(fp32), str(out / "dynamic_int8.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                     use_external_data_format=True)
    files.append(("quantize_dynamic int8 per channel (W8A8)", "int8 W8A8", out / "dynamic_int8.onnx",
                  time.perf_counter() - start))
    return files


def file_bytes(path: Path) -> int:
    """The ``.onnx`` file and every external data file it names."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    extra = {e.value for init in model.graph.initializer for e in init.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / name).stat().st_size for name in extra)


def bits_per_weight(path: Path) -> float:
    """Stored bits per weight of the file's quantized matrix products (the module docstring says what
    counts); a file with none counts its float ``MatMul``/``Gemm`` weights."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}

    def nbytes(name: str) -> int:
        return numpy_helper.to_array(inits[name]).nbytes if name in inits else 0

    stored = weights = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            weights += attrs["K"] * attrs["N"]
            stored += sum(nbytes(n) for n in node.input[1:4] if n)
        elif node.op_type == "MatMulInteger" and node.input[1] in inits:
            k, n = inits[node.input[1]].dims
            weights += k * n
            stored += nbytes(node.input[1]) + (nbytes(node.input[3]) if len(node.input) > 3 else 0) + 4 * n
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits:
            w = inits[node.input[0]]
            weights += int(np.prod(w.dims))
            stored += sum(nbytes(n) for n in node.input if n)
    if weights:
        return 8.0 * stored / weights
    floats = [inits[n.input[1]] for n in model.graph.node
              if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits]
    return 32.0 if floats else float("nan")


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not SPIN:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feeds_for(sess, tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    names = [i.name for i in sess.get_inputs()]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"the ONNX file takes inputs {names}; the benchmark has no {missing}")
    return {n: tensors[n].numpy() for n in names}


def first_output(sess, feeds: dict[str, np.ndarray]) -> torch.Tensor:
    outputs = [o.name for o in sess.get_outputs()]
    name = next((n for n in ("logits", "last_hidden_state", "output") if n in outputs), outputs[0])
    return torch.from_numpy(np.asarray(sess.run([name], feeds)[0]))


def latencies(sessions: dict[str, Any], cases: dict[str, dict[str, torch.Tensor]], repeats: int) -> dict[str, dict]:
    """Median ms per (file, case): warm-ups, then ``repeats`` runs, the files in turns."""
    out: dict[str, dict[str, float]] = {label: {} for label in sessions}
    for case, tensors in cases.items():
        feeds = {label: feeds_for(s, tensors) for label, s in sessions.items()}
        for label, s in sessions.items():
            for _ in range(WARMUPS):
                s.run(None, feeds[label])
        times: dict[str, list[float]] = {label: [] for label in sessions}
        for _ in range(repeats):
            for label, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, feeds[label])
                times[label].append(time.perf_counter() - t0)
        for label in sessions:
            out[label][case] = 1e3 * statistics.median(times[label])
    return out


# ----------------------------------------------------------------------------- qcompile (plug-in point)
def qcompile_rows(m: Model, out: Path, recipes: tuple[str, ...], cache: Path | None = None) -> list[dict]:
    """qcompile's ONNX files: compile with each recipe, export with ``qcompile.export_onnx``.

    This is where qcompile's exporter plugs in; until the checkout has ``qcompile.export_onnx``
    the rows say so and the peers still run."""
    export = getattr(qcompile, "export_onnx", None)
    if export is None:
        print("  qcompile.export_onnx not available in this checkout: qcompile rows skipped", flush=True)
        return [{"who": "qcompile", "label": "qcompile.export_onnx not available in this checkout", "kind": ""}]
    rows = []
    for recipe in recipes:
        family = next((k for k in QCOMPILE_SAME_KIND if recipe.startswith(k)), "")
        row = {"who": "qcompile", "label": f"{recipe} (qcompile.export_onnx, ort-cpu)",
               "kind": QCOMPILE_SAME_KIND.get(family, "")}
        path = out / f"qcompile_{recipe}.onnx"
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cm = compile_cached(cache, m.torch_model, dict(m.example), recipe=qcompile_recipe(recipe),
                                    calibration=m.calibration,
                                    tokenizer=m.tokenizer, progress=False, verify=False)
                report = export(cm, dict(m.example), str(path), target="ort-cpu")
        except Exception as e:  # a recipe the exporter refuses: recorded, the others still run
            row["label"] = f"{recipe}: not exported ({type(e).__name__}: {str(e).splitlines()[0]})"
            rows.append(row)
            print(f"  {row['label']}", flush=True)
            continue
        row.update(path=path, seconds=time.perf_counter() - start, report_file_bytes=report.file_bytes)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- one model
def bench(m: Model, repeats: int, qcompile_recipes: tuple[str, ...], keep: Path | None,
          cache: Path | None = None) -> dict:
    print(m.name, flush=True)
    if keep is not None:
        tmp = keep / m.name.replace(" ", "_")
        tmp.mkdir(parents=True, exist_ok=True)
        return _bench_in(m, repeats, qcompile_recipes, tmp, cache)
    with tempfile.TemporaryDirectory(prefix="onnx_ort_") as d:
        return _bench_in(m, repeats, qcompile_recipes, Path(d), cache)


def _bench_in(m: Model, repeats: int, qcompile_recipes: tuple[str, ...], tmp: Path, cache: Path | None) -> dict:
    fp32 = tmp / "float32.onnx"
    seconds = export_float(m, fp32)
    rows = [{"who": "torch.onnx", "label": "float32 (torch.onnx.export, dynamo=True)", "kind": "float",
             "path": fp32, "seconds": seconds}]
    rows += [{"who": "ONNX Runtime", "label": label, "kind": kind, "path": path, "seconds": s}
             for label, kind, path, s in ort_quantized(fp32, tmp)]
    rows += qcompile_rows(m, tmp, qcompile_recipes, cache)
    measured = [r for r in rows if "path" in r]
    sessions = {r["label"]: session(r["path"]) for r in measured}
    for r in measured:
        r["file_bytes"] = file_bytes(r["path"])
        r["bits"] = bits_per_weight(r["path"])
        s = sessions[r["label"]]
        r.update(m.score(first_output(s, feeds_for(s, m.accuracy_feeds))))
        print(f"  {r['label']:60s} {r['file_bytes'] / 2**20:8.1f} MiB  {r['bits']:5.2f} b/w  "
              f"cos {r['mean_cosine']:.5f}", flush=True)
    print(f"  timing {len(sessions)} files ({', '.join(m.latency_feeds)}; {repeats} runs each)", flush=True)
    times = latencies(sessions, m.latency_feeds, repeats)
    for r in measured:
        r["ms"] = times[r["label"]]
        r["path"] = str(r["path"])
    del sessions
    return {"model": m.name, "notes": m.notes, "cases": list(m.latency_feeds), "rows": rows}


# ----------------------------------------------------------------------------- output
def environment() -> str:
    import onnx
    import onnxruntime
    import transformers

    return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()} "
            f"({len(os.sched_getaffinity(0))} CPUs available, load average {os.getloadavg()[0]:.1f}), "
            f"torch {torch.__version__}, transformers {transformers.__version__}, onnx {onnx.__version__}, "
            f"onnxruntime {onnxruntime.__version__}, intra-op threads {THREADS}, thread spinning {'on' if SPIN else 'off'}")


def markdown(results: list[dict], repeats: int) -> str:
    lines = ["# ONNX Runtime on CPU: float32, ONNX Runtime's quantizers, qcompile's exports", "",
             f"Measured by `benchmarks/onnx_ort.py` on {environment()}. Latency: median of {repeats} runs after "
             f"{WARMUPS} warm-ups, every file's session in turns. Bits per weight: the quantized matrix products' "
             "codes, scales and zero points over their weights (the script's docstring says what counts).", ""]
    for res in results:
        lines += [f"## {res['model']}", "", *[f"- {n}" for n in res["notes"]], "",
                  "| who | file | kind | size MiB | bits/weight | "
                  + " | ".join(f"{c} ms" for c in res["cases"]) + " | mean cosine | min cosine |",
                  "|---|---|---|---:|---:|" + "---:|" * len(res["cases"]) + "---:|---:|"]
        for r in res["rows"]:
            if "ms" not in r:
                lines.append(f"| {r['who']} | {r['label']} | {r['kind']} |" + " |" * (4 + len(res["cases"])))
                continue
            ms = " | ".join(f"{r['ms'][c]:.2f}" for c in res["cases"])
            lines.append(f"| {r['who']} | {r['label']} | {r['kind']} | {r['file_bytes'] / 2**20:.1f} | {r['bits']:.2f} | "
                         f"{ms} | {r['mean_cosine']:.5f} | {r['min_cosine']:.5f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,decoder", help="comma-separated subset of minilm,decoder")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--spin", action="store_true", help="leave ONNX Runtime's thread spinning on (its default)")
    ap.add_argument("--qcompile-recipes", default=None,
                    help="comma-separated recipes for qcompile's rows (default: QCOMPILE_RECIPES per model)")
    ap.add_argument("--write", action="store_true", help="write docs/benchmarks/onnx-ort-cpu.md")
    ap.add_argument("--json", default=None, help="also write the raw rows here")
    ap.add_argument("--keep", type=Path, default=None, help="keep the ONNX files in this directory")
    ap.add_argument("--cache", type=Path, default=None,
                    help="reuse compiled models saved here (benchmarks/compiled_cache.py; accuracy.py shares it)")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    global SPIN
    SPIN = args.spin
    builders = {"minilm": minilm, "decoder": decoder}
    wanted = [m for m in args.models.split(",") if m]
    unknown = [m for m in wanted if m not in builders]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(builders)}")
    results = []
    for key in wanted:
        recipes = tuple(args.qcompile_recipes.split(",")) if args.qcompile_recipes else QCOMPILE_RECIPES[key]
        results.append(bench(builders[key](), args.repeats, recipes, args.keep, args.cache))
    text = markdown(results, args.repeats)
    print(text)
    if args.write:
        (ROOT / "docs" / "benchmarks" / "onnx-ort-cpu.md").write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
