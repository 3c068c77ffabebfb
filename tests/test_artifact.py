"""Artifacts are untrusted input: every broken case gets an ArtifactError naming the field;
passes that restore at load are not recomputed."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import qcompile
from qcompile.artifact import ArtifactError
from qcompile.passes import Pass, PassResult, register_pass
from tests.tiny_models import tiny_inputs, tiny_model

CALLS = {"run": 0, "restore": 0}


@register_pass("test_counted_restore")
class CountedRestore(Pass):
    """A data-dependent pass: computes a choice at compile time, restores it at load."""

    exact = False
    runs_before = ("quantize_weights",)
    requires = ("quant_decisions",)
    on_load = qcompile.OnLoad.RESTORE

    def run(self, gm, ctx):
        CALLS["run"] += 1
        return PassResult(False)

    def restore(self, gm, ctx):
        CALLS["restore"] += 1
        assert ctx.artifact is not None
        return PassResult(False)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("art") / "a"
    passes = ["canonicalize", "assign_quant_specs", "fold_norm_scales", "test_counted_restore", "quantize_weights",
              "lower"]
    cm = qcompile.compile(tiny_model("llama", layers=1), tiny_inputs(), recipe="w4a16", passes=passes, progress=False)
    cm.save(root)
    return root, cm


def _copy(artifact, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(artifact[0], dst)
    return dst


def _load(root):
    return qcompile.load(root, tiny_model("llama", layers=1), tiny_inputs())


def _edit_manifest(root, edit):
    m = json.loads((root / "manifest.json").read_text())
    edit(m)
    (root / "manifest.json").write_text(json.dumps(m))


def test_restoring_pass_is_not_recomputed_and_decisions_are_restored(artifact, tmp_path):
    root, cm = artifact
    CALLS.update(run=0, restore=0)
    loaded = _load(root)
    assert CALLS == {"run": 0, "restore": 1}
    m = json.loads((root / "manifest.json").read_text())
    assert {p["name"]: p["on_load"] for p in m["passes"]}["test_counted_restore"] == "restore"
    assert m["layers"]["lm_head"]["decision"]["weight"] is None
    ids = torch.randint(0, 256, (2, 5))
    torch.testing.assert_close(loaded(ids).logits, cm(ids).logits, rtol=0, atol=0)


def test_unknown_key(artifact, tmp_path):
    root = _copy(artifact, tmp_path)
    _edit_manifest(root, lambda m: m.update(surprise=1))
    with pytest.raises(ArtifactError, match=r"manifest field manifest: unknown key\(s\) 'surprise'"):
        _load(root)


def test_wrong_type(artifact, tmp_path):
    root = _copy(artifact, tmp_path)
    _edit_manifest(root, lambda m: m.update(dynamic="yes"))
    with pytest.raises(ArtifactError, match=r"manifest field manifest.dynamic: expected a bool"):
        _load(root)


def test_bad_spec_text(artifact, tmp_path):
    root = _copy(artifact, tmp_path)
    _edit_manifest(root, lambda m: m["layers"]["model.layers.0.mlp.up_proj"]["decision"].update(weight="int5-g7"))
    with pytest.raises(ArtifactError, match=r"layers.model.layers.0.mlp.up_proj.decision.weight.*unknown format 'int5'"):
        _load(root)


def test_dtype_outside_the_allow_list_in_the_manifest(artifact, tmp_path):
    root = _copy(artifact, tmp_path)

    def edit(m):
        m["layers"]["model.layers.0.mlp.up_proj"]["result"]["tensors"]["scale"]["dtype"] = "object"
    _edit_manifest(root, edit)
    with pytest.raises(ArtifactError, match=r"up_proj.result.tensors.scale.dtype: expected a dtype in"):
        _load(root)


def test_dtype_outside_the_allow_list_in_the_weights(artifact, tmp_path):
    root = _copy(artifact, tmp_path)
    state = load_file(str(root / "weights.safetensors"))
    state["model.layers.0.mlp.up_proj.scale"] = state["model.layers.0.mlp.up_proj.scale"].to(torch.complex64)
    save_file(state, str(root / "weights.safetensors"))
    with pytest.raises(ArtifactError, match=r"'model.layers.0.mlp.up_proj.scale' has dtype torch.complex64"):
        _load(root)


def test_missing_tensor(artifact, tmp_path):
    root = _copy(artifact, tmp_path)
    state = load_file(str(root / "weights.safetensors"))
    del state["model.layers.0.mlp.up_proj.zero"]
    save_file(state, str(root / "weights.safetensors"))
    with pytest.raises(ArtifactError, match=r"has no tensor 'model.layers.0.mlp.up_proj.zero'"):
        _load(root)


def test_tensor_shape_disagrees_with_the_manifest(artifact, tmp_path):
    root = _copy(artifact, tmp_path)
    state = load_file(str(root / "weights.safetensors"))
    key = "model.layers.0.mlp.up_proj.qdata"
    state[key] = state[key][:, :-1].contiguous()
    save_file(state, str(root / "weights.safetensors"))
    with pytest.raises(ArtifactError, match=r"tensor 'model.layers.0.mlp.up_proj.qdata' .* needs uint8"):
        _load(root)


def test_truncated_weights(artifact, tmp_path):
    root = _copy(artifact, tmp_path)
    data = (root / "weights.safetensors").read_bytes()
    (root / "weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"weights.safetensors is not a readable safetensors file"):
        _load(root)


def test_corrupted_weights_header(artifact, tmp_path):
    root = _copy(artifact, tmp_path)
    data = bytearray((root / "weights.safetensors").read_bytes())
    data[8:16] = b"\xff" * 8
    (root / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"not a readable safetensors file"):
        _load(root)


def test_manifest_not_json(artifact, tmp_path):
    root = _copy(artifact, tmp_path)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"manifest.json is not valid JSON"):
        _load(root)


def test_unregistered_pass_that_must_rerun(artifact, tmp_path):
    root = _copy(artifact, tmp_path)
    _edit_manifest(root, lambda m: m["passes"].insert(1, {"name": "from_elsewhere", "on_load": "rerun",
                                                          "ensures": [], "options": {}}))
    with pytest.raises(ArtifactError, match=r"pass 'from_elsewhere' must rerun at load, but it is not registered"):
        _load(root)


def test_a_layer_called_twice_is_a_named_save_error_and_a_report_note(tmp_path):
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 32)

        def forward(self, x):
            return self.b(torch.relu(self.a(torch.relu(self.a(x)))))

    cm = qcompile.compile(Twice(), torch.randn(4, 64), target="cpu", recipe="w8a16", progress=False)
    assert any("a (2 calls)" in n for n in cm.report().notes)
    with pytest.raises(ArtifactError, match="layer 'a' is called more than once"):
        cm.save(tmp_path / "twice")
    assert not (tmp_path / "twice").exists()


def test_per_layer_activation_specs_round_trip(tmp_path):
    """A recipe with activation overrides (w8a8-pt-smooth: per-tensor activations, per-token on the FFN down
    projections) is saved and restored with them; an artifact written before the field existed still loads."""
    model, inputs = tiny_model("llama", layers=1), tiny_inputs()
    cm = qcompile.compile(model, inputs, recipe="w8a8-pt-smooth", progress=False)
    cm.save(tmp_path / "a")
    layers = json.loads((tmp_path / "a" / "manifest.json").read_text())["layers"]
    assert layers["model.layers.0.mlp.down_proj"]["decision"]["activation"] == "int8-pc-scale:float32-dynamic"
    assert layers["model.layers.0.mlp.up_proj"]["decision"]["activation"] == "int8-pt-asym-scale:float32-dynamic"
    loaded = qcompile.load(tmp_path / "a", tiny_model("llama", layers=1), inputs)
    assert loaded.recipe == cm.recipe
    ids = torch.randint(0, 256, (2, 5))
    torch.testing.assert_close(loaded(ids).logits, cm(ids).logits, rtol=0, atol=0)
    _edit_manifest(tmp_path / "a", lambda m: m["recipe"].pop("activation_overrides"))
    assert qcompile.load(tmp_path / "a", tiny_model("llama", layers=1), inputs).recipe.activation_overrides == ()
