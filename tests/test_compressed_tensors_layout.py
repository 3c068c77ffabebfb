"""The compressed-tensors layout: every tensor unpacked with an independent reference reader of
compressed-tensors' conventions equals qcompile's own dequantization, and a plain transformers
model holding those weights computes what the compiled model computes."""

import json

import pytest
import torch
from safetensors.torch import load_file

import qcompile
from qcompile.artifact import ArtifactError
from qcompile.codegen.op_schema import QuantizedLinearCall, quantized_linear_nodes
from qcompile.compressed_tensors_layout import UnmappableError, to_compressed_tensors
from qcompile.formats import dequantize
from qcompile.formats.floating import E2M1_VALUES
from qcompile.ir.graph import module_path
from qcompile.models import build_from_config
from tests.tiny_models import tiny_inputs, tiny_model

MIXED_INT = {"*.o_proj": "int4-g32", "*.self_attn.*": "int4-g32-asym", "*.mlp.down_proj": "int8-pc-asym",
             "*.mlp.*": "int8"}


def _unpack_int32(words, bits, n, dim=1):
    """compressed-tensors' unpack: element j of each int32 word at bits bits*j, along ``dim``."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        w = w.t()
    per = 32 // bits
    codes = torch.stack([(w >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], dim=-1).reshape(w.shape[0], -1)
    codes = codes[:, :n]
    return codes.t() if dim == 0 else codes


def _reference_weight(tensors, prefix, scheme):
    """Dequantize one layer as compressed-tensors defines it: (q - zero_point) * scale per group;
    nvfp4: e2m1 * (scale / global_scale)."""
    w = scheme["weights"]
    scale = tensors[f"{prefix}.weight_scale"].float()
    if w["strategy"] == "tensor_group":
        packed = tensors[f"{prefix}.weight_packed"]
        codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1).long()
        local = (scale / tensors[f"{prefix}.weight_global_scale"]).repeat_interleave(16, dim=1)
        return E2M1_VALUES[codes] * local
    if f"{prefix}.weight_packed" in tensors:
        rows, k = tensors[f"{prefix}.weight_shape"].tolist()
        offset = 2 ** (w["num_bits"] - 1)
        q = _unpack_int32(tensors[f"{prefix}.weight_packed"], w["num_bits"], k) - offset
        zp = tensors.get(f"{prefix}.weight_zero_point")
        zp = torch.zeros_like(scale) if zp is None else _unpack_int32(zp, w["num_bits"], rows, dim=0) - offset
    else:
        q = tensors[f"{prefix}.weight"].float()
        zp = tensors.get(f"{prefix}.weight_zero_point", torch.zeros_like(scale)).float()
    group = w["group_size"] or q.shape[1]
    return (q.float() - zp.float().repeat_interleave(group, 1)) * scale.repeat_interleave(group, 1)


def _schemes(qc):
    out = {}
    for group in qc["config_groups"].values():
        for target in group["targets"]:
            out[target] = group
    return out


@pytest.mark.parametrize("recipe, overrides, fmt", [
    ("w4a16", MIXED_INT, "pack-quantized"),
    ("w8a8", None, "int-quantized"),
    ("fp8", None, "float-quantized"),
    ("nvfp4-w4a16", None, "nvfp4-pack-quantized"),
])
def test_every_layer_unpacks_to_qcompiles_own_dequantization(recipe, overrides, fmt):
    cm = qcompile.compile(tiny_model("llama", layers=1), tiny_inputs(), recipe=recipe, overrides=overrides,
                          verify=False, progress=False)
    layout = to_compressed_tensors(cm.graph_module, cm.manifest["transformers"])
    qc = layout.quantization_config
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == fmt and qc["ignore"] == ["lm_head"]
    schemes = _schemes(qc)
    nodes = quantized_linear_nodes(cm.graph_module)
    assert len(nodes) == 7
    for node in nodes:
        path = module_path(node)
        scheme = schemes.get(path) or schemes["Linear"]
        ours = dequantize(QuantizedLinearCall.from_node(node).resolve(cm.graph_module).quantized_weight())
        theirs = _reference_weight(layout.tensors, path, scheme)
        if fmt == "nvfp4-pack-quantized":  # a divisor where qcompile multiplies: one float32 rounding apart
            torch.testing.assert_close(theirs, ours, rtol=2**-22, atol=0)
        else:
            assert torch.equal(theirs, ours), path


def test_mixed_int_schemes_are_one_group_each():
    cm = qcompile.compile(tiny_model("llama", layers=1), tiny_inputs(), recipe="w4a16", overrides=MIXED_INT,
                          verify=False, progress=False)
    qc = to_compressed_tensors(cm.graph_module, cm.manifest["transformers"]).quantization_config
    by_target = {t: g["weights"] for g in qc["config_groups"].values() for t in g["targets"]}
    assert by_target["model.layers.0.self_attn.o_proj"] == {"num_bits": 4, "type": "int", "symmetric": True,
                                                            "group_size": 32, "strategy": "group", "dynamic": False}
    assert by_target["model.layers.0.self_attn.q_proj"]["symmetric"] is False
    assert by_target["model.layers.0.mlp.down_proj"] == {"num_bits": 8, "type": "int", "symmetric": False,
                                                         "group_size": None, "strategy": "channel", "dynamic": False}
    assert len(qc["config_groups"]) == 4


def test_a_transformers_model_with_the_unpacked_weights_computes_the_compiled_function(tmp_path):
    cm = qcompile.compile(tiny_model("llama"), tiny_inputs(), recipe="w4a16", overrides=MIXED_INT, verify=False,
                          progress=False)
    cm.save(tmp_path / "art", compressed_tensors=True)
    config = json.loads((tmp_path / "art" / "config.json").read_text())
    tensors = load_file(str(tmp_path / "art" / "model.safetensors"))
    schemes = _schemes(config["quantization_config"])
    hf = build_from_config("LlamaForCausalLM", config, {}, "test")
    state = {}
    for name in hf.state_dict():
        prefix = name.removesuffix(".weight")
        state[name] = _reference_weight(tensors, prefix, schemes[prefix]) if prefix in schemes else tensors[name]
    hf.load_state_dict(state, strict=True)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, use_cache=False).logits, cm(ids).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(qcompile.load(tmp_path / "art")(ids).logits, cm(ids).logits)  # the artifact still loads


@pytest.mark.parametrize("family, recipe, overrides, match", [
    ("gpt2", "w8a16", None, r"layer transformer.h.0.attn.c_attn: GPT2LMHeadModel has no nn.Linear there \(Conv1D\)"),
    ("llama", "mxfp4-w4a16", None, r"mxfp4 weights"),
    ("llama", "nvfp4", None, r"nvfp4 activations need a calibrated global scale"),
    ("llama", "w4a16", {"*": "int4-g48"}, r"in_features 64 is not a multiple of the group size 48"),
    ("llama", "w4a16-rotate-gptq", None, r"runs qcompile.hadamard_transform.default online"),
])
def test_what_does_not_map_is_named(family, recipe, overrides, match, tmp_path):
    cm = qcompile.compile(tiny_model(family, layers=1), tiny_inputs(), recipe=recipe, overrides=overrides, verify=False,
                          progress=False)
    with pytest.raises(UnmappableError, match=match):
        cm.save(tmp_path / "art", compressed_tensors=True)
    assert not (tmp_path / "art").exists()  # nothing written


def test_a_plain_module_has_no_compressed_tensors_layout(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    cm = qcompile.compile(model, torch.randn(2, 64), recipe="w8a16", progress=False)
    with pytest.raises(ArtifactError, match="needs a transformers model"):
        cm.save(tmp_path / "art", compressed_tensors=True)
