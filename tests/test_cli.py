"""The command line: JSON-only stdout, paths checked before work, one-line errors with exit
statuses, --debug tracebacks, info/load. In-process (``cli.main``), tiny models."""

import json

import pytest
import torch

import qcompile.models as models
from qcompile import cli
from tests.tiny_models import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tiny_model("llama", layers=1).save_pretrained(root / "llama_notok")
    return root


def _no_model_load(monkeypatch):
    """Fail the test if the CLI starts loading a model (the checks must come first)."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(models, "load_source", refuse)


def _error(capsys):
    """The error printed on stderr, checked to be one or two lines after any warnings."""
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("qcompile: warning:")]
    assert 1 <= len(lines) <= 2 and lines[0].startswith("qcompile: error: "), lines
    return "\n".join(lines)


def test_json_writes_only_json_to_stdout_and_the_artifact_is_checked_and_described(model_dir, monkeypatch, capsys):
    monkeypatch.chdir(model_dir)
    assert cli.main(["compile", "llama_notok", "--recipe", "w8a16", "--json", "--quiet", "--out", "art"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)  # the whole of stdout is one JSON document
    assert report["recipe"] == "w8a16" and report["layers"]
    assert "model.layers.0.mlp.up_proj" in err  # the table went to stderr
    assert cli.main(["info", "art", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["standalone"] and info["transformers_class"] == "LlamaForCausalLM"
    assert info["report"]["recipe"] == "w8a16" and "config.json" in info["files"]
    assert cli.main(["load", "art", "--json"]) == 0
    loaded = json.loads(capsys.readouterr().out)
    assert loaded["finite"] and loaded["outputs"][0] == [2, 16, 256]


@pytest.mark.parametrize("case", ["file", "foreign_dir", "under_a_file"])
def test_a_bad_out_path_fails_before_the_model_is_loaded(case, model_dir, tmp_path, monkeypatch, capsys):
    _no_model_load(monkeypatch)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    out = {"file": tmp_path / "afile", "foreign_dir": tmp_path / "foreign", "under_a_file": tmp_path / "afile" / "art"}[case]
    assert cli.main(["compile", str(model_dir / "llama_notok"), "--out", str(out)]) == 2
    msg = _error(capsys)
    expected = {"file": "it is a file, not a directory", "foreign_dir": "not a qcompile artifact (it holds notes.txt)",
                "under_a_file": "afile is a file, not a directory"}[case]
    assert expected in msg and "cannot write the artifact to" in msg
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_model_directory_problems_have_distinct_one_line_messages(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "nocfg").mkdir()
    (tmp_path / "nocfg" / "model.safetensors").write_text("")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    (tmp_path / "noarch").mkdir()
    (tmp_path / "noarch" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "noarch" / "model.safetensors").write_text("")
    (tmp_path / "badarch").mkdir()
    (tmp_path / "badarch" / "config.json").write_text('{"architectures": ["os.system"]}')
    (tmp_path / "badarch" / "model.safetensors").write_text("")
    (tmp_path / "afile").write_text("")
    expected = {
        "missing": "model 'missing': no such directory (and not a builtin; builtin models: minilm)",
        "empty": "model directory 'empty' is empty",
        "nocfg": "model directory 'nocfg' has no config.json (it holds model.safetensors)",
        "noweights": "has config.json but no weights",
        "noarch": 'names no "architectures"',
        "badarch": "'os.system' is not a transformers class name",
        "afile": "model 'afile' is a file",
    }
    for name, text in expected.items():
        assert cli.main(["compile", name]) == 2, name
        msg = _error(capsys)
        assert text in msg, (name, msg)
        assert "\n" not in msg


class Untraceable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        return y if y.sum() > 0 else -y  # data-dependent control flow


def _untraceable_source(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "check_model_dir", lambda source: tmp_path)
    monkeypatch.setattr(models, "load_source", lambda source: (Untraceable(), (torch.randn(2, 8),), {}))


def test_an_untraceable_model_is_one_error_and_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    _untraceable_source(monkeypatch, tmp_path)
    assert cli.main(["compile", "some_dir", "--quiet"]) == 1
    err = capsys.readouterr().err
    ours = [ln for ln in err.splitlines() if ln.startswith("qcompile: error:")]
    assert len(ours) == 1 and ours[0].startswith("qcompile: error: torch.export could not trace Untraceable")
    assert "symbolic_shapes.py" not in err  # torch's warning-level logs are held back without --debug
    with pytest.raises(Exception, match="could not trace Untraceable"):
        cli.main(["compile", "some_dir", "--quiet", "--debug"])


def test_an_untraceable_model_prints_no_graph_dump(tmp_path, monkeypatch, capsys):
    _untraceable_source(monkeypatch, tmp_path)
    assert cli.main(["compile", "some_dir", "--quiet"]) == 1
    _error(capsys)


def test_unexpected_errors_name_their_type_and_point_to_debug(monkeypatch, capsys):
    def boom(source):
        raise RuntimeError("first line\nsecond line\nthird line")
    monkeypatch.setattr(models, "load_source", boom)
    assert cli.main(["compile", "minilm", "--quiet"]) == 1
    msg = _error(capsys)
    assert msg == "qcompile: error: RuntimeError: first line\nsecond line (--debug for the traceback)"


def test_compressed_tensors_is_checked_before_the_model_is_loaded(tmp_path, monkeypatch, capsys):
    _no_model_load(monkeypatch)
    with pytest.raises(SystemExit) as e:
        cli.main(["compile", "minilm", "--compressed-tensors"])
    assert e.value.code == 2 and "--compressed-tensors needs --out" in capsys.readouterr().err
    assert cli.main(["compile", "minilm", "--recipe", "mxfp4", "--compressed-tensors", "--out", str(tmp_path / "a")]) == 2
    assert "recipe mxfp4: mxfp4 weights" in _error(capsys)
    assert cli.main(["compile", "minilm", "--recipe", "w4a16-rotate-gptq", "--compressed-tensors",
                     "--out", str(tmp_path / "a")]) == 2
    assert "online Hadamard" in _error(capsys)


def test_info_and_load_of_something_that_is_not_an_artifact(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["info", str(tmp_path / "missing")]) == 2
    assert "no such directory" in _error(capsys)
    assert cli.main(["load", str(tmp_path / "empty")]) == 2
    assert "is not a qcompile artifact (no manifest.json)" in _error(capsys)
