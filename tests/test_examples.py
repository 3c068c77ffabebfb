import importlib.util
from pathlib import Path

import torch
import transformers as tf

import qcompile

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_pass_example_registers_and_helps():
    _load("custom_pass")
    assert "mse_clip" in qcompile.registered_passes()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (2, 16))
    plain = qcompile.compile(model, ids, recipe="w4a16", progress=False)
    clipped = qcompile.compile(model, ids, recipe="w4a16", progress=False,
                               passes=["canonicalize", "fold_norm_scales", "mse_clip", "quantize_weights", "lower"])
    assert _weight_sq_error(clipped, model) < _weight_sq_error(plain, model)
    assert clipped.report().output_cosine > 0.98


def _weight_sq_error(cm, model):
    """Σ‖W − deq(Q(W))‖² over the quantized linears: what the clip search minimizes
    (the model's norms are all ones, so folding left the weights unchanged)."""
    from qcompile.codegen.op_schema import QuantizedLinearCall, quantized_linear_nodes
    from qcompile.formats import dequantize
    from qcompile.ir.graph import module_path

    total, gm = 0.0, cm.graph_module
    weights = dict(model.named_parameters())
    for node in quantized_linear_nodes(gm):
        qt = QuantizedLinearCall.from_node(node).resolve(gm).quantized_weight()
        total += float((dequantize(qt) - weights[module_path(node) + ".weight"].detach().float()).pow(2).sum())
    return total
