"""The op schema: the one place that knows quantized_linear's arguments, carrying whole specs."""

import pytest
import torch

import qcompile
from qcompile.codegen.op_schema import (
    QuantizedLinearCall,
    quantized_linear_nodes,
    quantized_linear_overload,
)
from qcompile.formats import QuantSpec, quantize
from qcompile.ir.annotations import result_of


def test_registered_op_schema_is_the_dataclass():
    schema = str(quantized_linear_overload()._schema)
    assert schema == f"qcompile::quantized_linear{QuantizedLinearCall.schema()}"


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 128)
        self.down = torch.nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("recipe", [name for name, r in qcompile.RECIPES.items() if r.weight is not None])
def test_every_recipes_specs_survive_lowering_and_artifacts(recipe, tmp_path):
    rcp = qcompile.get_recipe(recipe)
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    cm = qcompile.compile(MLP().eval(), x, target="blackwell", recipe=recipe, progress=False, verify=False)
    nodes = quantized_linear_nodes(cm.graph_module)
    assert nodes
    for node in nodes:
        call = QuantizedLinearCall.from_node(node)
        assert call.weight_spec == rcp.weight  # every field: format, group, symmetry, scale dtype
        assert call.act_spec == rcp.activation
        assert result_of(node).activation == rcp.activation
    cm.save(tmp_path / "art")
    loaded = qcompile.load(tmp_path / "art", MLP(), x)
    for node in quantized_linear_nodes(loaded.graph_module):
        call = QuantizedLinearCall.from_node(node)
        assert (call.weight_spec, call.act_spec) == (rcp.weight, rcp.activation)
    assert loaded.recipe == rcp
    torch.testing.assert_close(loaded(x), cm(x), rtol=0, atol=0)


def test_fp8_scale_dtype_and_activation_symmetry_are_kept():
    """The two fields the old argument list lost: a float32 scale dtype, an asymmetric activation."""
    w = QuantSpec("fp8_e4m3", scale_dtype="float32")
    a = QuantSpec("int4", group_size=32, symmetric=False, dynamic=True)
    qt = quantize(torch.randn(8, 64), w)
    call = QuantizedLinearCall.for_weight(torch.randn(2, 64), qt, qt.tensors(), None, a)
    back = QuantizedLinearCall.from_op_args(call.op_args())
    assert back.weight_spec == w and back.weight_spec.scale_dtype == "float32"
    assert back.act_spec == a and not back.act_spec.symmetric
    assert back.quantized_weight().shape == (8, 64)


def test_wrong_argument_count_names_the_arguments():
    with pytest.raises(ValueError, match="takes 9 to 11 arguments .*weight_spec"):
        QuantizedLinearCall.from_op_args((1, 2, 3))


@pytest.mark.parametrize("text", ["int4-g128-asym", "fp8_e4m3-pc-scale:float32-dynamic", "nvfp4-dynamic", "int8-pc"])
def test_spec_text_round_trip(text):
    assert QuantSpec.parse(text).encode() == text


def test_bad_spec_text_names_the_token():
    with pytest.raises(ValueError, match="cannot parse 'g12x'"):
        QuantSpec.parse("int4-g12x")
    with pytest.raises(ValueError, match="unknown scale_dtype"):
        QuantSpec("int8", scale_dtype="float64")
