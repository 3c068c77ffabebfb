"""Canonicalization turns Conv1d/Conv2d (groups = 1) into im2col-style linears, exactly; other
convolutions stay and carry the reason they are not quantized."""

import collections

import pytest
import torch
from torch import nn

from qcompile.frontend import export_model
from qcompile.ir.graph import FLOAT_REASON, linear_nodes, linear_weight, module_path
from qcompile.ir.ops import LINEAR
from qcompile.passes.base import PassContext, PassManager

aten = torch.ops.aten
CONVS = {aten.conv1d.default, aten.conv1d.padding, aten.conv2d.default, aten.conv2d.padding}

CASES = {
    "2d-3x3-pad1": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 9, 9)),
    "2d-stride2-nobias": (lambda: nn.Conv2d(4, 6, 3, stride=2, bias=False), (2, 4, 9, 9)),
    "2d-nonsquare-dilated": (lambda: nn.Conv2d(4, 6, (2, 3), stride=(1, 2), padding=(1, 2), dilation=(2, 1)), (2, 4, 9, 10)),
    "2d-same-even-kernel": (lambda: nn.Conv2d(4, 6, (2, 4), padding="same", dilation=(1, 3)), (2, 4, 9, 9)),
    "2d-valid": (lambda: nn.Conv2d(4, 6, 3, padding="valid"), (2, 4, 9, 9)),
    "2d-reflect": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (2, 4, 9, 9)),
    "2d-replicate": (lambda: nn.Conv2d(4, 6, 3, padding=2, padding_mode="replicate"), (2, 4, 9, 9)),
    "2d-circular": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"), (2, 4, 9, 9)),
    "2d-1x1": (lambda: nn.Conv2d(4, 6, 1), (2, 4, 9, 9)),
    "2d-1x1-stride2": (lambda: nn.Conv2d(4, 6, 1, stride=2), (2, 4, 9, 9)),
    "2d-unbatched": (lambda: nn.Conv2d(4, 6, 3, padding=1), (4, 9, 9)),
    "1d-k3-stride2-dilated": (lambda: nn.Conv1d(4, 6, 3, stride=2, dilation=2, padding=1), (2, 4, 17)),
    "1d-same": (lambda: nn.Conv1d(4, 6, 4, padding="same"), (2, 4, 17)),
    "1d-circular": (lambda: nn.Conv1d(4, 6, 3, padding=2, padding_mode="circular"), (2, 4, 17)),
    "1d-1x1": (lambda: nn.Conv1d(4, 6, 1), (2, 4, 17)),
}


class Wrapped(nn.Module):
    """The conv as a submodule, so it has a module path."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


def _canonical(model, x):
    ex = export_model(model, (x,))
    pm = PassManager.from_names(["canonicalize"], verify=True)
    gm = pm.run(ex.gm, PassContext(ex.args, ex.kwargs))
    return gm, pm.records[0]


def _targets(gm):
    return collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("case", sorted(CASES))
def test_conv_becomes_an_exact_linear(case):
    make, shape = CASES[case]
    model, x = Wrapped(make()).eval(), torch.randn(shape)
    gm, record = _canonical(model, x)
    counts = _targets(gm)
    assert not CONVS & set(counts), counts
    assert counts[LINEAR] == 1
    assert record.verified_error is not None and record.verified_error <= 1e-12  # float64 on the example
    (linear,) = linear_nodes(gm)
    assert module_path(linear) == "conv"
    conv = model.conv
    assert tuple(linear_weight(gm, linear).shape) == (conv.out_channels, conv.weight[0].numel())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    assert model.conv.weight.shape == conv.weight.shape  # the user's module is untouched


def test_other_spatial_sizes_and_channels_last_inputs():
    model = Wrapped(nn.Conv2d(4, 6, 3, stride=2, padding=1)).eval()
    gm, _ = _canonical(model, torch.randn(2, 4, 9, 9))
    with torch.no_grad():
        for x in (torch.randn(3, 4, 12, 7), torch.randn(2, 4, 9, 9).to(memory_format=torch.channels_last)):
            torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_pointwise_conv_is_a_permute_and_a_linear():
    gm, _ = _canonical(Wrapped(nn.Conv2d(4, 6, 1)).eval(), torch.randn(2, 4, 5, 5))
    counts = _targets(gm)
    assert aten.unfold.default not in counts and aten.flatten.using_ints not in counts
    assert counts[aten.permute.default] == 2 and counts[LINEAR] == 1


def test_root_conv_names_its_matrix_at_the_root():
    gm, _ = _canonical(nn.Conv2d(4, 6, 3).eval(), torch.randn(2, 4, 8, 8))
    (linear,) = linear_nodes(gm)
    assert module_path(linear) == "" and linear.args[1].target == "weight_im2col"


@pytest.mark.parametrize("conv, shape, reason", [
    (nn.Conv2d(8, 8, 3, groups=8), (2, 8, 9, 9), "depthwise conv"),
    (nn.Conv2d(8, 8, 3, groups=2), (2, 8, 9, 9), "grouped conv (groups = 2)"),
    (nn.ConvTranspose2d(4, 6, 3), (2, 4, 9, 9), "transposed conv"),
    (nn.Conv3d(4, 6, 3), (2, 4, 5, 5, 5), "Conv3d"),
])
def test_unsupported_convs_stay_and_say_why(conv, shape, reason):
    model, x = Wrapped(conv).eval(), torch.randn(shape)
    gm, _ = _canonical(model, x)
    (node,) = [n for n in gm.graph.nodes if FLOAT_REASON in n.meta]
    assert reason in node.meta[FLOAT_REASON] and module_path(node) == "conv"
    assert not linear_nodes(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


class ConvThenView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3)

    def forward(self, x):
        return self.conv(x).view(x.shape[0], -1)


def test_output_has_eager_strides():
    """A view after the conv needs eager's (contiguous) strides; a channels-last example keeps them."""
    model, x = ConvThenView().eval(), torch.randn(2, 4, 8, 8)
    gm, _ = _canonical(model, x)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    conv, x = Wrapped(nn.Conv2d(4, 6, 3)).eval(), x.to(memory_format=torch.channels_last)
    gm, _ = _canonical(conv, x)
    with torch.no_grad():
        assert gm(x).is_contiguous(memory_format=torch.channels_last) and not gm(x).is_contiguous()
    assert aten.clone.default not in _targets(gm)


def test_a_conv_called_twice_shares_its_matrix():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.relu(self.conv(x)))

    model, x = Twice().eval(), torch.randn(2, 4, 8, 8)
    gm, _ = _canonical(model, x)
    assert {n.args[1].target for n in linear_nodes(gm)} == {"conv.weight_im2col"}
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
