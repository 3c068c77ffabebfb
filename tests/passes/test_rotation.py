"""Rotation folding: the orthogonal matrices (formats/orthogonal.py), the three exact passes on
every family (verified in float64 by the PassManager through ``qcompile.compile``), the verifier
catching a wrong rotation, accuracy on planted outliers and on the real MiniLM, and save/load."""

import numpy as np
import pytest
import torch
import transformers as tf

import qcompile
import qcompile.passes.rotation as rotation_pass
from qcompile.formats import orthogonal as orth
from qcompile.frontend import export_model
from qcompile.ir.annotations import decided_nodes, decision_of
from qcompile.ir.graph import linear_nodes, module_path
from qcompile.ir.ops import HADAMARD_TRANSFORM
from qcompile.ir.verify import VerificationError
from qcompile.passes.base import PassContext, PassManager, PassRequirementError
from qcompile.passes.norm_folding import FoldNormScales
from qcompile.passes.rotation import RotateResidual, RotationError
from qcompile.passes.rotation_heads import RotateHeads
from qcompile.passes.rotation_online import RotateOnline
from qcompile.recipes import get_recipe
from tests.outlier_models import outlier_setup
from tests.tiny_models import FAMILIES, VOCAB, _perturb_norms, tiny_inputs, tiny_model

ROTATIONS = ("rotate_residual", "rotate_heads", "rotate_online")


def pipeline(*rotations, quantizer="quantize_weights"):
    return ["canonicalize", "assign_quant_specs", FoldNormScales(when="always"), *rotations, quantizer, "lower"]


def extra_model(family: str) -> torch.nn.Module:
    """Families beyond tests/tiny_models.py, from transformers configs (2 layers, hidden 64)."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    if family == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=16))
    elif family == "phi3":
        model = tf.Phi3ForCausalLM(tf.Phi3Config(**common, pad_token_id=0))
    else:
        model = tf.GemmaForCausalLM(tf.GemmaConfig(**common, head_dim=16))
    _perturb_norms(model)
    return model.eval()


def logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


# ------------------------------------------------------------------------------ orthogonal matrices
MODEL_SIZES = {  # size -> the Hadamard core m of n = p·m (1: a power of two)
    64: 1, 384: 12, 576: 36, 896: 28, 1536: 12, 3072: 12, 4096: 1, 4864: 76, 5632: 44, 8960: 140,
    11008: 344, 13824: 108, 14336: 28, 18944: 148,
}


def test_hadamard_orders_and_matrices():
    for m in (12, 20, 24, 28, 36, 44, 52, 60, 76, 100, 108, 140, 148, 244, 344):  # Paley I/II cores, GF(p^k) too
        h = orth.hadamard_matrix(m)
        assert torch.equal(h @ h.t(), m * torch.eye(m, dtype=torch.float64)), m
    for n in (64, 384, 576, 1536):
        h = orth.hadamard_matrix(n)
        assert set(h.unique().tolist()) == {-1.0, 1.0}
        assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64)), n
    for n, m in MODEL_SIZES.items():
        assert orth.covered(n) == "hadamard" and orth.hadamard_split(n) == (n // m, m), n
    assert orth.covered(172) == "hadamard-random" and orth.covered(9) == "random"  # 172 = 4·43 (Williamson only)
    with pytest.raises(ValueError, match="no Hadamard matrix of order 172"):
        orth.hadamard_matrix(172)


@pytest.mark.parametrize("kind", orth.KINDS)
def test_rotations_are_orthonormal_and_seeded(kind):
    sizes = (12, 20, 28, 36, 52, 64, 9, 172, 384, 576, 1536) if kind == "hadamard" else (9, 64, 384)
    for n in sizes:
        q = orth.rotation(n, seed=3, kind=kind)
        assert q.dtype == torch.float64 and q.shape == (n, n)
        assert (q @ q.t() - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-10, n
        assert torch.equal(q, orth.rotation(n, seed=3, kind=kind))
        assert not torch.equal(q, orth.rotation(n, seed=4, kind=kind))
        x = torch.randn(5, n, dtype=torch.float64)
        r = orth.rotation_factors(n, 3, kind)
        torch.testing.assert_close(r.apply(x), x @ q, rtol=0, atol=1e-12)
        torch.testing.assert_close(r.apply_transpose(x), x @ q.t(), rtol=0, atol=1e-12)
    q = orth.random_orthogonal(48, 7)
    assert torch.equal(q, orth.random_orthogonal(48, 7)) and (q @ q.t() - torch.eye(48, dtype=torch.float64)).abs().max() < 1e-12


@pytest.mark.parametrize("n", [11008, 14336, 18944])
def test_large_rotations_are_orthonormal(n):
    """Too large to form densely here: the core is an exact Hadamard matrix and 64 rows of Q
    (Q applied to unit vectors) are orthonormal and norm-preserving."""
    r = orth.rotation_factors(n, seed=1)
    m = r.block.shape[0]
    assert torch.equal(r.block @ r.block.t(), m * torch.eye(m, dtype=torch.float64))
    units = torch.zeros(64, n, dtype=torch.float64)
    units[torch.arange(64), torch.randperm(n)[:64]] = 1.0
    rows = r.apply(units)
    assert (rows @ rows.t() - torch.eye(64, dtype=torch.float64)).abs().max() < 1e-10
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(r.apply(x).norm(dim=1), x.norm(dim=1), rtol=1e-12, atol=0)


def test_online_op_reference_and_dtypes():
    r = orth.rotation_factors(384, seed=2)
    x = torch.randn(2, 3, 384, dtype=torch.float64)
    y = HADAMARD_TRANSFORM(x, r.signs, r.block, r.scale)
    torch.testing.assert_close(y, x @ r.matrix(), rtol=0, atol=1e-12)
    yb = HADAMARD_TRANSFORM(x.bfloat16(), r.signs.float(), r.block.float(), r.scale)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.double(), x.bfloat16().double() @ r.matrix(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(("n", "group"), [(384, 128), (1536, 128), (96, 12), (64, 64)])
def test_grouped_rotations_are_block_diagonal_and_orthonormal(n, group):
    r = orth.grouped_rotation_factors(n, group, seed=4)
    q = r.matrix()
    torch.testing.assert_close(q, torch.block_diag(*[orth.rotation_factors(group, seed=4).matrix()] * (n // group)),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(q @ q.t(), torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-10)
    x = torch.randn(2, 5, n, dtype=torch.float64)
    torch.testing.assert_close(r.apply_transpose(r.apply(x)), x, rtol=0, atol=1e-10)
    y = HADAMARD_TRANSFORM(x, r.signs, r.block, r.scale, r.groups)
    torch.testing.assert_close(y, x @ q, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="does not divide"):
        orth.grouped_rotation_factors(n, 7 if n % 7 else 5, seed=4)


# ------------------------------------------------------------------------------ exactness per family
SKIP_R1 = {"bert": "post-norm", "gemma": "canonicalize did not recognize it"}


@pytest.mark.parametrize("family", [*FAMILIES, "qwen3", "phi3", "gemma"])
def test_rotations_are_exact(family):
    model = tiny_model(family) if family in FAMILIES else extra_model(family)
    cm = qcompile.compile(model, tiny_inputs(), recipe="w4a4", passes=pipeline(*ROTATIONS), verify=True, progress=False)
    records = {p["name"]: p for p in cm.report().passes}
    for name in ROTATIONS:
        rec = records[name]
        if rec["changed"]:
            assert rec["verified_rel_error"] is not None and rec["verified_rel_error"] <= 1e-6, (name, rec)
    r1 = records["rotate_residual"]["stats"]
    if family in SKIP_R1:
        assert not r1["rotated"] and SKIP_R1[family] in r1["skipped"]
    else:
        assert r1["rotated"] and r1["writers"] == 4 and r1["centered"] == (family in ("gpt2", "opt"))
        assert r1["layer_norms_to_rms"] == (5 if family in ("gpt2", "opt") else 0)
    assert records["rotate_heads"]["stats"]["attentions"] == 2
    online = records["rotate_online"]["stats"]
    assert online["targets"] == ("all" if family == "bert" else "down")
    assert online["transforms_inserted"] == (8 if family == "bert" else 2)
    transforms = [n for n in cm.graph_module.graph.nodes if n.target is HADAMARD_TRANSFORM]
    assert len(transforms) == online["transforms_inserted"]
    with torch.no_grad():
        out = logits(cm(*tiny_inputs()))
    assert torch.isfinite(out).all()


def test_extras_record_the_rotations():
    model = tiny_model("llama")
    ex = export_model(model, tiny_inputs())
    ctx = PassContext(ex.args, ex.kwargs, recipe=get_recipe("w4a4"))
    passes = [qcompile.passes.make_pass(n) for n in ("canonicalize", "assign_quant_specs")]
    passes += [FoldNormScales(when="always"), RotateResidual(seed=5), RotateHeads(seed=5),
               RotateOnline(seed=5, targets="all")]
    gm = PassManager(passes, verify=False).run(ex.gm, ctx)
    by_path = {module_path(n): decision_of(n).extras for n in linear_nodes(gm)}
    assert by_path["model.layers.0.self_attn.q_proj"]["rotate_residual"] == {
        "kind": "hadamard", "seed": 5, "size": 64, "centered": False, "side": "input"}
    assert by_path["model.layers.1.mlp.down_proj"]["rotate_residual"]["side"] == "output"
    assert by_path["lm_head"]["rotate_residual"]["side"] == "input"
    heads = by_path["model.layers.0.self_attn.v_proj"]["rotate_heads"]
    assert heads["size"] == 16 and heads["kv_heads"] == 2 and heads["heads"] == 4 and heads["side"] == "output"
    online = {p: e["rotate_online"] for p, e in by_path.items() if "rotate_online" in e}
    assert len(online) == 14 and "lm_head" not in online  # every quantized linear; the float LM head is no target
    assert len({o["group"] for o in online.values()}) == 8  # q/k/v and gate/up share their transforms
    assert online["model.layers.0.self_attn.q_proj"]["group"] == online["model.layers.0.self_attn.v_proj"]["group"]


def test_verifier_catches_a_wrong_rotation(monkeypatch):
    def skewed(size, seed, kind):
        block = torch.eye(size, dtype=torch.float64) + 0.05 * torch.randn(size, size, dtype=torch.float64)
        return orth.Rotation(size, "random", seed, None, 1, block, 1.0, block_is_hadamard=False)

    monkeypatch.setattr(rotation_pass, "make_rotation", skewed)
    with pytest.raises(VerificationError, match="exact pass 'rotate_residual' changed the model's output"):
        qcompile.compile(tiny_model("llama"), tiny_inputs(), recipe="w4a4", passes=pipeline("rotate_residual"),
                         verify=True, progress=False)


def test_residual_rotation_needs_folded_norms():
    with pytest.raises(PassRequirementError, match="norms_folded"):
        qcompile.compile(tiny_model("llama"), tiny_inputs(), recipe="w4a4",
                         passes=["canonicalize", "assign_quant_specs", "rotate_residual", "quantize_weights", "lower"],
                         progress=False)
    ex = export_model(tiny_model("llama"), tiny_inputs())
    ctx = PassContext(ex.args, ex.kwargs, recipe=get_recipe("w4a4"))
    gm = PassManager.from_names(["canonicalize", "assign_quant_specs"], verify=False).run(ex.gm, ctx)
    with pytest.raises(RotationError, match=r"fold_norm_scales\(when='always'\)"):
        RotateResidual().run(gm, ctx)  # norms still carry their scales


# ------------------------------------------------------------------------------ accuracy
def _loss(cm, ids, ref):
    with torch.no_grad():
        out = logits(cm(ids)).double().flatten()
    return 1.0 - float(torch.nn.functional.cosine_similarity(out, ref.double().flatten(), dim=0))


@pytest.fixture(scope="module")
def outliers():
    return outlier_setup()


def test_outlier_llama_w4a4_rotation_recovers_half_of_rtn_loss(outliers):
    """W4A4: RTN loses the o_proj/down_proj inputs to the planted outliers; R1 + an online rotation
    of every quantized input + GPTQ (QuaRot's setup) recovers well over half of the loss."""
    model, calib, evaluation, ref = outliers
    rtn = qcompile.compile(model, calib[0], recipe="w4a4", calibration=calib, verify=False, progress=False)
    rot = qcompile.compile(model, calib[0], recipe="w4a4", calibration=calib, verify=False, progress=False,
                           passes=pipeline("rotate_residual", RotateOnline(targets="all"), quantizer="gptq"))
    loss_rtn, loss_rot = _loss(rtn, evaluation, ref), _loss(rot, evaluation, ref)
    assert loss_rot <= 0.5 * loss_rtn, (loss_rtn, loss_rot)  # measured 0.211 -> 0.080


def test_outlier_llama_w8a8_rotation_recovers_half_of_rtn_loss(outliers):
    model, calib, evaluation, ref = outliers
    rtn = qcompile.compile(model, calib[0], recipe="w8a8", verify=False, progress=False)
    rot = qcompile.compile(model, calib[0], recipe="w8a8", verify=False, progress=False,
                           passes=pipeline("rotate_residual", RotateOnline(targets="all")))
    loss_rtn, loss_rot = _loss(rtn, evaluation, ref), _loss(rot, evaluation, ref)
    assert loss_rot <= 0.5 * loss_rtn, (loss_rtn, loss_rot)


@pytest.mark.xfail(strict=True, reason=(
    "outlier_llama's outliers are compensated (rows x40, consumer columns /40): the W4 loss is on the weight side, "
    "and a rotation cannot undo a diagonal rescaling (it spreads the consumer's weight error over the loud "
    "channels); an equalization of v/o and up/down (scale migration) undoes it exactly. docs/rotation.md"))
def test_outlier_llama_w4a8_rotation_recovers_half_of_rtn_loss(outliers):
    model, calib, evaluation, ref = outliers
    rtn = qcompile.compile(model, calib[0], recipe="w4a8", verify=False, progress=False)
    rot = qcompile.compile(model, calib[0], recipe="w4a8", verify=False, progress=False,
                           passes=pipeline("rotate_residual", "rotate_online"))
    assert _loss(rot, evaluation, ref) <= 0.5 * _loss(rtn, evaluation, ref)


def test_minilm_rotate_online_is_exact_and_improves_w4a4():
    from qcompile.demo import embedding_agreement, load_minilm, mean_pool

    model, _, enc = load_minilm(max_sentences=12)
    with torch.no_grad():
        ref = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])

    def embed(cm):
        with torch.no_grad():
            return mean_pool(cm(**enc).last_hidden_state, enc["attention_mask"])

    rtn = qcompile.compile(model, enc, recipe="w4a4", verify=False, progress=False)
    rot = qcompile.compile(model, enc, recipe="w4a4", verify=True, progress=False,
                           passes=["canonicalize", "assign_quant_specs", "rotate_online", "quantize_weights", "lower"])
    rec = next(p for p in rot.report().passes if p["name"] == "rotate_online")
    assert rec["stats"]["targets"] == "all" and rec["stats"]["transforms_inserted"] == 24  # 4 per layer, Q/K/V share
    assert rec["stats"]["sizes"] == {"384": "hadamard", "1536": "hadamard"}
    assert rec["verified_rel_error"] <= 1e-6
    base, ours = embedding_agreement(ref, embed(rtn)), embedding_agreement(ref, embed(rot))
    assert ours["mean_cosine"] >= base["mean_cosine"] + 0.05, (base, ours)  # measured 0.794 -> 0.929 (12 sentences)


def test_grouped_online_rotation_is_exact_and_restored(tmp_path):
    """``rotate_online(group_size=...)``: one transform per input as before, each ``I ⊗ Q_g`` (the
    op's ``groups``), exact in float64; sizes it does not divide are rotated whole; the artifact
    restores the grouping."""
    model = tiny_model("bert")  # post-norm: every quantized input, hidden 64, intermediate 128
    passes = ["canonicalize", "assign_quant_specs", RotateOnline(targets="all", group_size=32), "quantize_weights",
              "lower"]
    cm = qcompile.compile(model, tiny_inputs(), recipe="w4a16", passes=passes, verify=True, progress=False)
    rec = next(p for p in cm.report().passes if p["name"] == "rotate_online")
    assert rec["verified_rel_error"] is not None and rec["verified_rel_error"] <= 1e-6
    assert rec["stats"]["sizes"] == {"64": "2 groups of 32: hadamard", "128": "4 groups of 32: hadamard"}
    transforms = [n for n in cm.graph_module.graph.nodes if n.target is HADAMARD_TRANSFORM]
    assert len(transforms) == 8 and sorted({n.args[4] for n in transforms}) == [2, 4]
    cm.save(tmp_path / "art")
    loaded = qcompile.load(tmp_path / "art", tiny_model("bert"))
    assert [n.args[4] for n in loaded.graph_module.graph.nodes if n.target is HADAMARD_TRANSFORM] == [
        n.args[4] for n in transforms]
    inputs = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded(*inputs)), logits(cm(*inputs)), rtol=0, atol=0)
    whole = RotateOnline(targets="all", group_size=48)  # divides neither 64 nor 128: whole rotations
    cm = qcompile.compile(model, tiny_inputs(), recipe="w4a16", verify=True, progress=False,
                          passes=["canonicalize", "assign_quant_specs", whole, "quantize_weights", "lower"])
    rec = next(p for p in cm.report().passes if p["name"] == "rotate_online")
    assert rec["stats"]["sizes"] == {"64": "hadamard", "128": "hadamard"}
    with pytest.raises(ValueError, match="group_size"):
        RotateOnline(group_size=1)


# ------------------------------------------------------------------------------ artifacts
def test_save_load_round_trip_restores_without_recomputing(tmp_path, monkeypatch):
    model = tiny_model("llama")
    cm = qcompile.compile(model, tiny_inputs(), recipe="w4a4", passes=pipeline(*ROTATIONS), progress=False)
    cm.save(tmp_path / "art")
    fresh = tiny_model("llama")
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(torch.randn_like(p))  # load must not read these weights

    folds, rotations = [], []
    real = rotation_pass.make_rotation
    monkeypatch.setattr(rotation_pass, "_fold", lambda fn, w: folds.append(w.shape))
    monkeypatch.setattr(rotation_pass, "make_rotation",
                        lambda size, seed, kind, group=None: rotations.append((size, seed, kind)) or real(size, seed, kind,
                                                                                                  group))
    loaded = qcompile.load(tmp_path / "art", fresh)
    assert folds == []  # the rotated weights come from the artifact, not from the rebuilt model
    recorded = sorted((d.extras["rotate_online"]["size"], d.extras["rotate_online"]["seed"], "hadamard")
                      for _, d in decided_nodes(cm.graph_module) if "rotate_online" in d.extras)
    assert sorted(rotations) == recorded  # only the online buffers, rebuilt from the recorded seeds
    x = tiny_inputs()
    with torch.no_grad():
        a, b = logits(cm(*x)), logits(loaded(*x))
    assert torch.equal(a, b)
    assert [n.name for n in loaded.graph_module.graph.nodes] == [n.name for n in cm.graph_module.graph.nodes]
    np.testing.assert_array_equal(sorted(loaded.graph_module.state_dict()), sorted(cm.graph_module.state_dict()))
