"""A researcher's pass in a few dozen lines: MSE-optimal weight clipping before RTN.

Round-to-nearest spends its levels on the range [min, max] of each group; a
slightly smaller range often loses less to rounding than it loses to clipping.
This pass searches, per output row, the clipping ratio that minimizes the
quantized weight's squared error (the clip search of AWQ and OmniQuant, in its
simplest form), writes the clipped weights, and hands over to the normal RTN
quantizer. It reads each layer's decision (what ``assign_quant_specs`` chose from
the recipe) and records its choice in the decision's extras, so the artifact keeps
it. It is lossy, so it says so (``exact = False``); at load its effect is already in
the saved weights, so it is skipped (``on_load = SKIP``).

    python examples/custom_pass.py
"""

import torch
import transformers as tf

import qcompile
from qcompile.formats import dequantize, quantize
from qcompile.ir.annotations import decision_of, set_decision
from qcompile.ir.graph import get_attr, linear_nodes, set_attr

RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


@qcompile.register_pass("mse_clip")
class MSEClip(qcompile.Pass):
    exact = False
    runs_after = ("assign_quant_specs",)  # reads the decisions
    runs_before = ("quantize_weights",)  # writes the weights RTN then quantizes
    requires = ("quant_decisions",)
    on_load = qcompile.OnLoad.SKIP

    def run(self, gm, ctx):
        chosen = []
        for node in linear_nodes(gm):
            decision = decision_of(node)
            if decision is None or not decision.quantized:
                continue  # a layer the recipe keeps in float
            target = node.args[1].target
            w = get_attr(gm, target).float()
            amax = w.abs().amax(dim=1, keepdim=True)
            errors = []
            for r in RATIOS:
                clipped = w.clamp(-r * amax, r * amax)
                errors.append((dequantize(quantize(clipped, decision.weight)) - w).pow(2).sum(dim=1))
            best = torch.stack(errors).argmin(dim=0)
            ratio = torch.tensor(RATIOS)[best].unsqueeze(1)
            set_attr(gm, target, w.clamp(-ratio * amax, ratio * amax).to(get_attr(gm, target).dtype))
            set_decision(node, decision.replace(extras={**decision.extras, self.name: {"mean_ratio": float(ratio.mean())}}))
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
    passes = ["canonicalize", "assign_quant_specs", "fold_norm_scales", "mse_clip", "quantize_weights", "lower"]
    clipped = qcompile.compile(model, ids, recipe="w4a16", passes=passes, progress=False)
    stats = next(p["stats"] for p in clipped.report().to_dict()["passes"] if p["name"] == "mse_clip")
    print(f"mse_clip: {stats}")
    print(f"logits cosine to float: plain RTN {plain.report().output_cosine:.5f}, "
          f"with MSE clipping {clipped.report().output_cosine:.5f}")


if __name__ == "__main__":
    main()
