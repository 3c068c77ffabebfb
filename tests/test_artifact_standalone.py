"""Artifacts load without their source: the architecture comes from config.json, every tensor
(float remainder and non-persistent buffers included) from weights.safetensors."""

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import qcompile
import qcompile.models as models
from qcompile import cli
from qcompile.artifact import ArtifactError, ArtifactPathError
from tests.tiny_models import tiny_inputs, tiny_model


def _no_checkpoint_reads(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("load read a checkpoint")
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(models, "load_source", refuse)


def test_cli_artifact_from_a_relative_path_loads_elsewhere_after_the_model_dir_is_gone(tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    tiny_model("llama", layers=1).save_pretrained(work / "llama_notok")
    reference = qcompile.compile(transformers.LlamaForCausalLM.from_pretrained(work / "llama_notok"), tiny_inputs(),
                                 recipe="w4a16", verify=False, progress=False)
    monkeypatch.chdir(work)
    assert cli.main(["compile", "llama_notok", "--recipe", "w4a16", "--out", "art", "--quiet", "--no-verify"]) == 0
    shutil.move(str(work / "art"), str(elsewhere / "art"))
    shutil.rmtree(work)
    monkeypatch.chdir(elsewhere)
    _no_checkpoint_reads(monkeypatch)
    loaded = qcompile.load("art")
    ids = torch.randint(0, 256, (3, 7))
    assert torch.equal(loaded(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_standalone_load_is_bit_identical(family, tmp_path, monkeypatch):
    """bert: padded attention masks, position-id buffers, no pooler; gpt2: tied LM head."""
    model = tiny_model(family, layers=1)
    ids = torch.randint(0, 256, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    cm = qcompile.compile(model, {"input_ids": ids, "attention_mask": mask}, recipe="w8a16", progress=False)
    cm.save(tmp_path / "art")
    _no_checkpoint_reads(monkeypatch)
    loaded = qcompile.load(tmp_path / "art")
    ids = torch.randint(0, 256, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, 2:] = 0
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask)[0], cm(input_ids=ids, attention_mask=mask)[0])


@pytest.fixture(scope="module")
def llama_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("standalone") / "art"
    cm = qcompile.compile(tiny_model("llama", layers=1), tiny_inputs(), recipe="w4a16", progress=False)
    cm.save(root)
    return root, cm


def _copy(root, tmp_path):
    shutil.copytree(root, tmp_path / "copy")
    return tmp_path / "copy"


def test_non_persistent_buffers_come_from_the_artifact(llama_artifact, tmp_path):
    root = _copy(llama_artifact[0], tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["buffers"] == ["model.rotary_emb.inv_freq"]
    assert manifest["transformers"] == {"class": "LlamaForCausalLM", "init_kwargs": {}}
    state = load_file(str(root / "weights.safetensors"))
    state["model.rotary_emb.inv_freq"] = state["model.rotary_emb.inv_freq"] * 2
    save_file(state, str(root / "weights.safetensors"))
    ids = torch.randint(0, 256, (2, 6))
    assert not torch.equal(qcompile.load(root)(ids).logits, llama_artifact[1](ids).logits)
    del state["model.rotary_emb.inv_freq"]
    save_file(state, str(root / "weights.safetensors"))
    with pytest.raises(ArtifactError, match=r"has no tensor 'model.rotary_emb.inv_freq' \(manifest.buffers\)"):
        qcompile.load(root)


def test_config_problems_are_named(llama_artifact, tmp_path):
    root = _copy(llama_artifact[0], tmp_path)
    (root / "config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"config.json is not valid JSON"):
        qcompile.load(root)
    (root / "config.json").unlink()
    with pytest.raises(ArtifactError, match=r"config.json is missing"):
        qcompile.load(root)


@pytest.mark.parametrize("name, match", [("os.system", "is not a transformers class name"),
                                         ("NoSuchModel", "has no model class 'NoSuchModel'"),
                                         ("LlamaConfig", "has no model class 'LlamaConfig'")])
def test_the_transformers_class_is_checked(name, match, llama_artifact, tmp_path):
    root = _copy(llama_artifact[0], tmp_path)
    m = json.loads((root / "manifest.json").read_text())
    m["transformers"]["class"] = name
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=match):
        qcompile.load(root)


def test_init_kwargs_are_schema_checked(llama_artifact, tmp_path):
    root = _copy(llama_artifact[0], tmp_path)
    m = json.loads((root / "manifest.json").read_text())
    m["transformers"]["init_kwargs"] = {"add_pooling_layer": [1]}
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"manifest.transformers.init_kwargs.add_pooling_layer"):
        qcompile.load(root)


class Plain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.lin(x)


def test_a_plain_module_artifact_asks_for_the_model(tmp_path):
    cm = qcompile.compile(Plain(), torch.randn(2, 64), recipe="w8a16", progress=False)
    cm.save(tmp_path / "art")
    assert not (tmp_path / "art" / "config.json").exists()
    with pytest.raises(ValueError, match=r"holds a plain nn.Module .*Plain.*pass an instance of it"):
        qcompile.load(tmp_path / "art")
    x = torch.randn(3, 64)
    assert torch.equal(qcompile.load(tmp_path / "art", Plain())(x), cm(x))


def test_save_refuses_a_foreign_directory_and_overwrites_an_artifact(llama_artifact, tmp_path):
    cm = llama_artifact[1]
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(ArtifactPathError, match=r"not a qcompile artifact \(it holds config.json\)"):
        cm.save(tmp_path / "model")
    assert (tmp_path / "model" / "config.json").read_text() == "{}"
    root = _copy(llama_artifact[0], tmp_path)
    (root / "model.safetensors").write_text("stale")
    cm.save(root)
    assert not (root / "model.safetensors").exists()
    qcompile.load(root)


def test_a_loaded_artifact_saves_again_standalone(llama_artifact, tmp_path):
    again = qcompile.load(llama_artifact[0]).save(tmp_path / "again")
    ids = torch.randint(0, 256, (2, 5))
    assert torch.equal(qcompile.load(again)(ids).logits, llama_artifact[1](ids).logits)


def test_string_overrides_survive_save_and_load(tmp_path):
    """Overrides given as text were written as bytes (``str.encode``) and broke ``save``."""
    cm = qcompile.compile(tiny_model("llama", layers=1), tiny_inputs(), recipe="w4a16",
                          overrides={"*.o_proj": "int8", "*.mlp.*": None}, verify=False, progress=False)
    cm.save(tmp_path / "art")
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["overrides"] == {"*.o_proj": "int8",
                                                                                       "*.mlp.*": None}
    ids = torch.randint(0, 256, (2, 5))
    assert torch.equal(qcompile.load(tmp_path / "art")(ids).logits, cm(ids).logits)
