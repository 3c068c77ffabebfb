"""``qcompile`` command line: compile a model directory or a builtin demo."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console


def _compile(args: argparse.Namespace) -> int:
    import torch

    import qcompile
    from qcompile.demo import DEMO_NAME, embedding_agreement, mean_pool
    from qcompile.models import load_source

    console = Console(width=None if sys.stdout.isatty() else 160)
    model, ex_args, ex_kwargs = load_source(args.model)
    cm = qcompile.compile(model, ex_args, target=args.target, recipe=args.recipe, example_kwargs=ex_kwargs,
                          verify=args.verify, progress=not args.quiet)
    cm.manifest["source"] = args.model
    console.print(cm.report())
    for note in cm.report().notes:
        console.print(f"[yellow]note:[/] {note}")
    if args.model == DEMO_NAME:
        with torch.no_grad():
            ref = mean_pool(model(**ex_kwargs).last_hidden_state, ex_kwargs["attention_mask"])
            out = mean_pool(cm(**ex_kwargs).last_hidden_state, ex_kwargs["attention_mask"])
        m = embedding_agreement(ref, out)
        console.print(
            f"sentence embeddings vs float32 over {m['sentences']} README sentences: mean cosine "
            f"{m['mean_cosine']:.5f}, min cosine {m['min_cosine']:.5f}, same nearest neighbour {m['same_nearest_neighbour']:.3f}"
        )
    if args.out:
        cm.save(args.out)
        console.print(f"saved to {args.out}")
    if args.json:
        print(cm.report().to_json())
    return 0


def main(argv: list[str] | None = None) -> int:
    from qcompile.recipes import RECIPES
    from qcompile.targets import TARGETS

    parser = argparse.ArgumentParser(prog="qcompile", description="Quantization compiler for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile a model directory or a builtin demo and print the report")
    c.add_argument("model", help="a Hugging Face model directory, or 'minilm' (the embedded all-MiniLM-L6-v2)")
    c.add_argument("--target", default="cpu", choices=sorted(TARGETS))
    c.add_argument("--recipe", default=None, choices=sorted(RECIPES), help="default: the target's default recipe")
    c.add_argument("--out", default=None, help="write the artifact (manifest.json + weights.safetensors) here")
    c.add_argument("--json", action="store_true", help="also print the report as JSON")
    c.add_argument("--no-verify", dest="verify", action="store_false", help="skip float64 checks of exact passes")
    c.add_argument("--quiet", action="store_true", help="no progress display")
    sub.add_parser("recipes", help="list recipes")
    sub.add_parser("targets", help="list targets")
    args = parser.parse_args(argv)
    if args.command == "compile":
        return _compile(args)
    if args.command == "recipes":
        for r in RECIPES.values():
            print(f"{r.name:14s} {r.description}")
    if args.command == "targets":
        for t in TARGETS.values():
            print(f"{t.name:10s} default recipe {t.default_recipe:8s} {t.description}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
