"""A researcher's pass in a few dozen lines: MSE-optimal weight clipping before RTN.

Round-to-nearest spends its levels on the range [min, max] of each group; a
slightly smaller range often loses less to rounding than it loses to clipping.
This pass searches, per output row, the clipping ratio that minimizes the
quantized weight's squared error (the clip search of AWQ and OmniQuant, in its
simplest form), writes the clipped weights, and hands over to the normal RTN
quantizer. It is lossy, so it says so (``exact = False``) and reports its choices.

    python examples/custom_pass.py
"""

import torch
import transformers as tf

import qcompile
from qcompile.formats import dequantize, quantize
from qcompile.ir.graph import get_attr, linear_nodes, module_path, set_attr

RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


@qcompile.register_pass("mse_clip")
class MSEClip(qcompile.Pass):
    exact = False

    def run(self, gm, ctx):
        chosen = []
        for node in linear_nodes(gm):
            specs = ctx.recipe.spec_for(module_path(node))
            if specs is None:
                continue  # a layer the recipe keeps in float
            target = node.args[1].target
            w = get_attr(gm, target).float()
            amax = w.abs().amax(dim=1, keepdim=True)
            errors = []
            for r in RATIOS:
                clipped = w.clamp(-r * amax, r * amax)
                errors.append((dequantize(quantize(clipped, specs[0])) - w).pow(2).sum(dim=1))
            best = torch.stack(errors).argmin(dim=0)
            ratio = torch.tensor(RATIOS)[best].unsqueeze(1)
            set_attr(gm, target, w.clamp(-ratio * amax, ratio * amax).to(get_attr(gm, target).dtype))
            chosen.append(float(ratio.mean()))
        stats = {"layers": len(chosen), "mean_ratio": sum(chosen) / max(len(chosen), 1)}
        return qcompile.PassResult(bool(chosen), stats)


def main() -> None:
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    model = tf.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 512, (2, 32))

    plain = qcompile.compile(model, ids, recipe="w4a16", progress=False)
    passes = ["canonicalize", "fold_norm_scales", "mse_clip", "quantize_weights", "lower"]
    clipped = qcompile.compile(model, ids, recipe="w4a16", passes=passes, progress=False)
    stats = next(p["stats"] for p in clipped.report().to_dict()["passes"] if p["name"] == "mse_clip")
    print(f"mse_clip: {stats}")
    print(f"logits cosine to float: plain RTN {plain.report().output_cosine:.5f}, "
          f"with MSE clipping {clipped.report().output_cosine:.5f}")


if __name__ == "__main__":
    main()
