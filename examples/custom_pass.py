"""A researcher's pass in a few dozen lines: clip weight outliers before RTN.

Percentile clipping is a classic trick: a few huge weights stretch a group's
scale and waste levels on everybody else. This pass clips every quantized
linear's weight to its 99.9th |w| percentile per output row, then hands over to
the normal RTN quantizer. It is lossy, so it says so (``exact = False``) and
reports how much it clipped; the compile report then shows what it bought.

    python examples/custom_pass.py
"""

import torch
import transformers as tf

import qcompile
from qcompile.ir.graph import get_attr, linear_nodes, module_path, set_attr


@qcompile.register_pass("clip_outlier_weights")
class ClipOutlierWeights(qcompile.Pass):
    exact = False
    quantile = 0.999

    def run(self, gm, ctx):
        clipped = 0
        for node in linear_nodes(gm):
            if ctx.recipe.spec_for(module_path(node)) is None:
                continue  # a layer the recipe keeps in float
            target = node.args[1].target
            w = get_attr(gm, target)
            limit = torch.quantile(w.abs().float(), self.quantile, dim=1, keepdim=True)
            clipped += int((w.abs() > limit).sum())
            set_attr(gm, target, torch.maximum(torch.minimum(w, limit), -limit).to(w.dtype))
        return qcompile.PassResult(clipped > 0, {"clipped_weights": clipped})


def main() -> None:
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # plant a few outlier weights, as trained models have
        for layer in model.model.layers:
            w = layer.mlp.down_proj.weight
            w.view(-1)[torch.randint(0, w.numel(), (20,))] *= 40
    ids = torch.randint(0, 512, (2, 32))

    plain = qcompile.compile(model, ids, recipe="w4a16", progress=False)
    passes = ["canonicalize", "fold_norm_scales", "clip_outlier_weights", "quantize_weights", "lower"]
    clipped = qcompile.compile(model, ids, recipe="w4a16", passes=passes, progress=False)
    print(clipped.report())
    print(f"logits cosine to float: plain RTN {plain.report().output_cosine:.5f}, "
          f"with clipping {clipped.report().output_cosine:.5f}")


if __name__ == "__main__":
    main()
