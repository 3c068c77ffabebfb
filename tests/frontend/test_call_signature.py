"""A compiled model takes the arguments its model's ``forward`` takes: positional or keyword,
optional ones present or absent; a new structure is re-traced once, sharing the compiled tensors."""

import warnings

import pytest
import torch

import qcompile
from tests.tiny_models import VOCAB, tiny_model


def _ids(batch=2, seq=8):
    return torch.randint(0, VOCAB, (batch, seq))


def _mask(ids):
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: changes every logit of row 0
    return mask


def _retrace_warnings(record):
    return [w for w in record if "re-traced" in str(w.message)]


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    torch.manual_seed(1)
    ids = _ids()
    cm = qcompile.compile(model, (ids,), recipe="w8a16", progress=False, verify=False)
    return model, cm, ids


def test_traced_positionally_called_with_attention_mask(llama):
    model, cm, ids = llama
    mask = _mask(ids)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, use_cache=False).logits
        unmasked = model(ids, use_cache=False).logits
    with pytest.warns(UserWarning, match=r"called with \(input_ids 2-D, attention_mask 2-D\); the compiled graph takes \(input_ids 2-D\): "
                                        r"re-traced in [0-9.]+ s"):
        out = cm(ids, attention_mask=mask).logits
    # quantized (w8a16) against float: close; and the mask really was applied
    assert (out - ref).abs().max() < 0.05 < (unmasked - ref).abs().max()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        again = cm(ids, mask).logits  # positional, same structure: the cached graph
        kw = cm(input_ids=ids, attention_mask=mask).logits
    assert not _retrace_warnings(record)
    torch.testing.assert_close(again, out)
    torch.testing.assert_close(kw, out)


def test_arguments_equal_to_defaults_need_no_retrace(llama):
    _, cm, ids = llama
    base = cm(ids).logits
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = cm(input_ids=ids, attention_mask=None, use_cache=False, labels=None).logits
    assert not _retrace_warnings(record)
    torch.testing.assert_close(out, base)


def test_retrace_shares_the_compiled_tensors_and_holds_no_float_weights(llama):
    _, cm, ids = llama
    cm(ids, attention_mask=_mask(ids))
    retraced = [gm for gm, _ in cm._graphs.values()]
    assert retraced
    compiled = {k: t.data_ptr() for k, t in cm.graph_module.state_dict().items()}
    for gm in retraced:
        assert {k: t.data_ptr() for k, t in gm.state_dict().items()} == compiled
    assert all(p.is_meta for p in cm._skeleton.parameters())


def test_traced_with_a_dict_called_positionally():
    model = tiny_model("bert")
    ids = _ids()
    mask = _mask(ids)
    cm = qcompile.compile(model, {"input_ids": ids, "attention_mask": mask}, recipe="w8a16", progress=False,
                          verify=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        positional = cm(ids, mask).last_hidden_state
        keyword = cm(attention_mask=mask, input_ids=ids).last_hidden_state
    assert not _retrace_warnings(record)
    torch.testing.assert_close(positional, keyword)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state
    assert torch.nn.functional.cosine_similarity(positional.flatten(), ref.flatten(), dim=0) > 0.999


def test_what_cannot_work_is_named(llama):
    _, cm, ids = llama
    with pytest.raises(ValueError, match=r"use_cache=True is not supported.*pins use_cache=False"):
        cm(ids, use_cache=True)
    with pytest.raises(TypeError, match=r"LlamaForCausalLM.forward\(\): too many positional arguments"):
        cm(ids, None, None, None, None, None, None, None, None, None, None)
    with pytest.raises(TypeError, match=r"argument 'attention_mask' holds a object"):
        cm(ids, attention_mask=object())
    with pytest.raises(qcompile.frontend.ExportError, match=r"re-tracing for a call with \(input_ids 3-D\) failed: "
                                                            r"torch.export could not trace"):
        cm(ids[..., None])  # 3-D token ids: a new structure, and one the model cannot take


class Explicit(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 8)

    def forward(self, x, scale=None):
        y = self.lin(x)
        return y if scale is None else y * scale


def test_unknown_keyword_is_named_and_optional_tensor_retraces():
    model = Explicit()
    x = torch.randn(2, 16)
    cm = qcompile.compile(model, (x,), recipe="w8a16", progress=False, verify=False)
    with pytest.raises(TypeError, match=r"Explicit.forward\(\): got an unexpected keyword argument 'bias'"):
        cm(x, bias=1)
    scale = torch.full((8,), 3.0)
    with pytest.warns(UserWarning, match="re-traced"):
        out = cm(x, scale)
    torch.testing.assert_close(out, cm(x) * 3.0)


def test_loaded_artifact_binds_calls_the_same_way(llama, tmp_path):
    _, cm, ids = llama
    mask = _mask(ids)
    cm.save(tmp_path)
    torch.manual_seed(5)
    loaded = qcompile.load(tmp_path, tiny_model("llama"), (ids,))
    with pytest.warns(UserWarning, match="re-traced"):
        out = loaded(ids, attention_mask=mask).logits
    torch.testing.assert_close(out, cm(ids, attention_mask=mask).logits)
