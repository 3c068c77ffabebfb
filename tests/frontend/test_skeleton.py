import torch

from qcompile.frontend.skeleton import architecture_skeleton


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.register_buffer("running", torch.ones(4))
        self.register_buffer("inv_freq", torch.arange(4.0), persistent=False)
        self.register_buffer("embed_scale", torch.tensor(2.0), persistent=False)


def test_skeleton_drops_the_weights_and_keeps_the_non_persistent_buffers():
    model = _Model()
    skeleton = architecture_skeleton(model)
    assert skeleton.linear.weight.is_meta and skeleton.running.is_meta
    assert torch.equal(skeleton.inv_freq, model.inv_freq) and skeleton.inv_freq is not model.inv_freq
    assert skeleton.embed_scale.device.type == "cpu" and skeleton.embed_scale.item() == 2.0
    assert not model.linear.weight.is_meta and not model.running.is_meta     # the user's model is unchanged


def test_a_model_without_weights_is_its_own_skeleton():
    with torch.device("meta"):
        model = torch.nn.Linear(4, 4)
    assert architecture_skeleton(model) is model
