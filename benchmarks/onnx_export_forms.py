"""Quick CPU timing of the ONNX forms qcompile.export_onnx emits, on the real all-MiniLM-L6-v2 in ONNX
Runtime (the full comparison with ONNX Runtime's quantizers is benchmarks/onnx_ort.py):

- float32 (torch.onnx export of the model), ONNX Runtime's own ``quantize_dynamic`` of it (int8
  per-channel weights, per-tensor uint8 ``DynamicQuantizeLinear`` activations), and qcompile's W8A8
  export (per-token int8 activations through QuantizeLinear + MatMulInteger);
- qcompile's w4a16 and w8a16 exports at MatMulNBits ``accuracy_level`` 0 (float32, the default) and 4;
- which ops ONNX Runtime fuses each file into (its optimized-model dump), and each file's agreement with
  qcompile's reference (max rel err, cosine) on the benchmark's inputs.

    python benchmarks/onnx_export_forms.py [--threads 2] [--rounds 5] [--out results.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

import qcompile
from qcompile.demo import load_minilm
from qcompile.onnx_export.export import _graph_call, agreement, reference_graph


def session(path: Path, threads: int, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def median_ms(s: ort.InferenceSession, feeds: dict, seconds: float) -> float:
    for _ in range(3):
        s.run(None, feeds)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t = time.perf_counter()
        s.run(None, feeds)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def fused_ops(path: Path, threads: int) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as d:
        opt = Path(d) / "opt.onnx"
        session(path, threads, opt)
        return dict(collections.Counter((n.domain + "." if n.domain else "") + n.op_type
                                        for n in onnx.load(str(opt)).graph.node))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model, tokenizer, enc = load_minilm(max_sentences=8)
    shapes = [(1, 16), (1, 128), (8, 128)]
    text = "qcompile exports quantized transformers for ONNX Runtime on a CPU. " * 20
    feeds_by_shape = {}
    for b, s in shapes:
        ids = tokenizer([text] * b, truncation=True, max_length=s, padding="max_length", return_tensors="pt")
        feeds_by_shape[(b, s)] = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}
    work = Path(tempfile.mkdtemp())
    files: dict[str, Path] = {}
    refs: dict[str, object] = {}

    float_path = work / "float.onnx"
    torch.onnx.export(model.eval(), (), str(float_path), kwargs=dict(enc), dynamo=True, optimize=True, external_data=False,
                      dynamic_shapes={"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},
                                      "attention_mask": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}})
    files["float32"] = float_path
    files["ort quantize_dynamic int8"] = work / "ort_dynamic.onnx"
    quantize_dynamic(str(float_path), str(files["ort quantize_dynamic int8"]), weight_type=QuantType.QInt8,
                     per_channel=True)
    for recipe, levels in (("w8a8", (0,)), ("w4a16", (0, 4)), ("w8a16", (0, 4))):
        cm = qcompile.compile(model, enc, target="ort-cpu", recipe=recipe, progress=False, verify=False)
        gm, a, k = _graph_call(cm, (), dict(feeds_by_shape[(8, 128)]))
        refs[recipe] = (reference_graph(gm), a, k)
        for level in levels:
            name = f"qcompile {recipe} (accuracy_level {level})"
            files[name] = work / f"{recipe}_{level}.onnx"
            qcompile.export_onnx(cm, enc, files[name], accuracy_level=level)

    results = {"machine": f"{torch.get_num_threads()} torch threads; ORT intra-op threads {args.threads}",
               "versions": {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "torch": torch.__version__},
               "date": time.strftime("%Y-%m-%d"), "files": {}}
    sessions = {name: session(path, args.threads) for name, path in files.items()}
    for name, path in files.items():
        size = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))
        row = {"bytes": size, "fused_ops": fused_ops(path, args.threads), "ms": {}}
        recipe = next((r for r in refs if f" {r} " in name), None)
        if recipe is not None:
            gm, a, k = refs[recipe]
            with torch.no_grad():
                ref = gm(*a, **k).last_hidden_state
            feeds = feeds_by_shape[(8, 128)]
            s = sessions[name]
            got = torch.from_numpy(s.run(None, {i.name: feeds[i.name].numpy() for i in s.get_inputs()})[0])
            rel, cos = agreement([got], [ref])
            row["vs_qcompile_reference"] = {"max_rel_error": rel, "cosine": cos}
        results["files"][name] = row
    # interleaved rounds, best median per file and shape: other load on the machine inflates some rounds
    for shape, feeds in feeds_by_shape.items():
        key = f"{shape[0]}x{shape[1]}"
        for _ in range(args.rounds):
            for name, s in sessions.items():
                np_feeds = {i.name: feeds[i.name].numpy() for i in s.get_inputs()}
                ms = round(median_ms(s, np_feeds, seconds=0.4), 3)
                row = results["files"][name]["ms"]
                row[key] = min(row.get(key, ms), ms)
    for name, row in results["files"].items():
        print(name, json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
