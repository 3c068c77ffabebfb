"""FuseSiblingLinears: Q/K/V and gate/up merged into one quantized linear, exact in float64, the
compiled graph it copies unchanged."""

import copy
import warnings

import pytest
import torch
from torch import fx

import qcompile
from qcompile.codegen.op_schema import quantized_linear_nodes
from qcompile.passes import FuseEpilogues, FuseSiblingLinears, PassContext, PassManager
from tests.tiny_models import VOCAB, tiny_model


def _compiled(family, recipe):
    ids = torch.randint(0, VOCAB, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qcompile.compile(tiny_model(family), {"input_ids": ids}, recipe=recipe, progress=False), ids


def _fuse(cm, ids, epilogues=False, verify=True):
    """A copy of the compiled graph through FuseSiblingLinears (and FuseEpilogues): the copy and the
    last pass's record."""
    gm = fx.GraphModule(cm.graph_module, copy.deepcopy(cm.graph_module.graph))
    ctx = PassContext((), {"input_ids": ids, **cm.pinned_kwargs}, cm.target, cm.recipe)
    ctx.properties.add("lowered")
    manager = PassManager([FuseSiblingLinears(), *([FuseEpilogues()] if epilogues else [])], verify=verify)
    manager.run(gm, ctx)
    return gm, manager.records[-1]


@pytest.mark.parametrize("family, recipe, groups", [("llama", "w4a16", 4), ("qwen2", "w8a8", 4), ("opt", "w4a16", 2),
                                                    ("bert", "w8a16", 2)])
def test_siblings_merge_exactly(family, recipe, groups):
    cm, ids = _compiled(family, recipe)
    before = {k: v.clone() for k, v in cm.graph_module.state_dict().items()}
    n_before = len(quantized_linear_nodes(cm.graph_module))
    gm, record = _fuse(cm, ids)
    assert record.changed and record.verified_error is not None and record.verified_error <= 1e-6
    assert len(record.stats["fused"]) == groups
    merged = sum(len(g) for g in record.stats["fused"])
    assert len(quantized_linear_nodes(gm)) == n_before - merged + groups
    out, ref = gm(input_ids=ids, **cm.pinned_kwargs), cm(ids)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)
    after = cm.graph_module.state_dict()               # the compiled graph is untouched
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert len(quantized_linear_nodes(cm.graph_module)) == n_before


def test_different_global_scales_are_left_alone_and_said():
    cm, ids = _compiled("llama", "nvfp4")
    _, record = _fuse(cm, ids)
    assert not record.changed and record.stats["notes"][0].startswith("not fused (different global scales)")


def test_generation_fuses_and_matches_unfused():
    from qcompile.runtime.decoder import CachedDecoder

    cm, ids = _compiled("llama", "w4a16")
    fused = cm.generate(ids, 6)
    assert len(cm._decoder.fusions) == 4
    cm._decoder = CachedDecoder(cm, fuse=False)
    assert cm._decoder.fusions == [] and torch.equal(cm.generate(ids, 6), fused)


@pytest.mark.parametrize("family, recipe, silu, residual", [("llama", "w4a16", 2, 4), ("qwen2", "w8a8", 2, 4),
                                                            ("opt", "w8a16", 0, 4), ("gpt2", "w8a16", 0, 0)])
def test_epilogues_fuse_exactly(family, recipe, silu, residual):
    from qcompile.codegen.op_schema import QuantizedLinearCall

    cm, ids = _compiled(family, recipe)
    gm, record = _fuse(cm, ids, epilogues=True)
    assert not record.changed or record.verified_error is not None and record.verified_error <= 1e-6
    assert len(record.stats["silu_mul"]) == silu and len(record.stats["residual"]) == residual
    calls = [QuantizedLinearCall.from_node(n) for n in quantized_linear_nodes(gm)]
    assert sum(c.epilogue == "silu_mul" for c in calls) == silu
    assert sum(c.residual is not None for c in calls) == residual
    torch.testing.assert_close(gm(input_ids=ids, **cm.pinned_kwargs)[0], cm(ids)[0], rtol=0, atol=0)


def test_epilogues_on_the_triton_path_match_the_graph():
    """The fused graph with the Triton kernels (the interpreter on CPU, the GPU where there is one), bf16:
    the same logits as the unfused graph on the same kernels, to bf16 rounding."""
    from qcompile.codegen import gemm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model("llama").to(device, torch.bfloat16)
    ids = torch.randint(0, VOCAB, (2, 5), device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = qcompile.compile(model, {"input_ids": ids}, recipe="w4a16", progress=False, verify=False)
    gm, _ = _fuse(cm, ids, epilogues=True, verify=False)
    with gemm.force_triton():
        ref, out = cm(ids)[0].float(), gm(input_ids=ids, **cm.pinned_kwargs)[0].float()
    assert torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.9999
