import networkx as nx
import torch

from qcompile.frontend import export_model
from qcompile.ir.graph import (
    consumers,
    get_attr,
    linear_nodes,
    module_path,
    producers,
    set_attr,
    to_networkx,
)
from qcompile.passes.base import PassContext, PassManager
from tests.tiny_models import tiny_inputs, tiny_model


def _canonical(family="llama"):
    model = tiny_model(family)
    ex = export_model(model, tiny_inputs())
    gm = PassManager.from_names(["canonicalize"], verify=False).run(ex.gm, PassContext(ex.args, ex.kwargs))
    return model, gm


def test_linears_carry_module_paths():
    _, gm = _canonical()
    paths = {module_path(n) for n in linear_nodes(gm)}
    assert "model.layers.0.self_attn.q_proj" in paths
    assert "model.layers.1.mlp.down_proj" in paths
    assert "lm_head" in paths
    assert len(paths) == 2 * 7 + 1


def test_producers_consumers_and_networkx_view():
    _, gm = _canonical()
    q = next(n for n in linear_nodes(gm) if module_path(n).endswith("0.self_attn.q_proj"))
    norm = producers(q)[0]
    assert {module_path(c).rsplit(".", 1)[-1] for c in consumers(norm)} == {"q_proj", "k_proj", "v_proj"}
    g = to_networkx(gm)
    assert nx.is_directed_acyclic_graph(g)
    assert nx.has_path(g, norm.name, q.name)
    assert g.nodes[q.name]["module_path"] == module_path(q)


def test_set_attr_never_touches_the_users_model():
    model, gm = _canonical()
    before = model.model.layers[0].mlp.down_proj.weight.clone()
    target = next(n for n in linear_nodes(gm) if module_path(n).endswith("0.mlp.down_proj")).args[1].target
    set_attr(gm, target, torch.zeros_like(get_attr(gm, target)))
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before)
    assert isinstance(get_attr(gm, target), torch.nn.Parameter)
