"""End to end on a GPU: compile transformers models on CUDA and check that the
quantized linears take the Triton path (no fallback warning) and stay accurate.

Per recipe: a Llama-shaped model (2 layers, hidden 4096, intermediate 14336,
bf16, random weights) compiled on CUDA; logits cosine to bf16; whether any
linear fell back to the reference kernel (the op warns once per combination);
and the median forward time against the bf16 model for one token and for a
512-token prefill, measured in the same run.

    python benchmarks/check_compile_gpu.py   # on the device machine
"""

from __future__ import annotations

import warnings

import torch
import transformers as tf
from triton.testing import do_bench

import qcompile

RECIPES = ["w8a16", "w4a16", "fp8", "nvfp4-w4a16", "w4a8"]


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    example = torch.randint(0, 32000, (2, 16), device="cuda")
    decode = torch.randint(0, 32000, (1, 1), device="cuda")
    prefill = torch.randint(0, 32000, (1, 512), device="cuda")
    with torch.no_grad():
        t_dec = do_bench(lambda: model(decode, use_cache=False), return_mode="median")
        t_pre = do_bench(lambda: model(prefill, use_cache=False), return_mode="median")
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    print(f"{'recipe':12s} {'cosine':>8s} {'fallbacks':>9s} {'1-tok ms':>9s} {'bf16 ms':>8s} {'512-tok ms':>10s} {'bf16 ms':>8s}")
    for name in RECIPES:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cm = qcompile.compile(model, example, target="hopper", recipe=name, progress=False, verify=False)
            with torch.no_grad():
                ref = model(prefill[:, :64], use_cache=False).logits.float()
                out = cm(prefill[:, :64]).logits.float()
            fallbacks = [str(w.message) for w in caught if "no Triton kernel" in str(w.message) or "unavailable" in str(w.message)]
        cos = torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0).item()
        q_dec = do_bench(lambda cm=cm: cm(decode), return_mode="median")
        q_pre = do_bench(lambda cm=cm: cm(prefill), return_mode="median")
        print(f"{name:12s} {cos:8.5f} {len(fallbacks):9d} {q_dec:9.3f} {t_dec:8.3f} {q_pre:10.3f} {t_pre:8.3f}")
        for f in fallbacks:
            print("   fallback:", f)
        del cm
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
