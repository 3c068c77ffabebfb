"""``qcompile generate``: a model directory with its tokenizer, compiled and generating in-process."""

import pytest
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

from qcompile import cli
from tests.tiny_models import VOCAB, tiny_model


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    tiny_model("llama", layers=1).save_pretrained(root)
    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tf.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", eos_token="w1", pad_token="w0").save_pretrained(root)
    return root


def test_generate_prints_text_and_speed(llm_dir, capsys):
    rc = cli.main(["generate", str(llm_dir), "--prompt", "w5 w9 w17 w3", "--recipe", "w8a16", "--kv", "int8",
                   "--max-new-tokens", "5", "--ignore-eos", "--quiet"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert len(out[0].split()) == 5 and all(w.startswith("w") or w == "[UNK]" for w in out[0].split())
    prompt = len(tf.AutoTokenizer.from_pretrained(llm_dir)("w5 w9 w17 w3")["input_ids"])
    assert f"w8a16, KV cache int8, cpu: prompt {prompt} tokens" in out[-1] and "5 new tokens" in out[-1]
    assert "tokens/s" in out[-1]


def test_generate_without_a_tokenizer_is_one_error(tmp_path, capsys):
    tiny_model("llama", layers=1).save_pretrained(tmp_path)
    capsys.readouterr()
    assert cli.main(["generate", str(tmp_path), "--prompt", "hi", "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"qcompile: error: {tmp_path}: no tokenizer that transformers can load")
