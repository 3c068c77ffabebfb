"""Outlier splitting on a GPU: do the split recipes run on CUDA, which kernels do their layers take,
and what do the splits cost in time next to the plain recipe.

A Llama-shaped model (2 layers, hidden 4096, intermediate 14336, bf16, random weights, so the
accuracy column says only that nothing broke) compiled for ``hopper`` with each plain recipe and its
split variant; per recipe: logits cosine to bf16, the fallback warnings the quantized op raised
(``no Triton kernel``), and the median forward time for one token and a 512-token prefill.

    python benchmarks/check_outlier_split_gpu.py   # on the device machine
"""

from __future__ import annotations

import warnings

import torch
import transformers as tf
from triton.testing import do_bench

import qcompile

PAIRS = [("w8a8", "w8a8-llmint8"), ("w4a8", "w4a8-llmint8"), ("w4a16", "w4a16-sparse"), ("nvfp4", "nvfp4-arc")]


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    example = torch.randint(0, 32000, (2, 16), device="cuda")
    calib = [torch.randint(0, 32000, (4, 64), device="cuda") for _ in range(2)]
    decode = torch.randint(0, 32000, (1, 1), device="cuda")
    prefill = torch.randint(0, 32000, (1, 512), device="cuda")
    with torch.no_grad():
        ref = model(prefill[:, :64], use_cache=False).logits.float()
        t_dec = do_bench(lambda: model(decode, use_cache=False), return_mode="median")
        t_pre = do_bench(lambda: model(prefill, use_cache=False), return_mode="median")
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; bf16: 1 token {t_dec:.3f} ms, 512 tokens "
          f"{t_pre:.3f} ms")
    print(f"{'recipe':14s} {'cosine':>8s} {'1-tok ms':>9s} {'512-tok ms':>10s}  fallbacks / split notes")
    for pair in PAIRS:
        for name in pair:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    cm = qcompile.compile(model, example, target="hopper", recipe=name, calibration=calib,
                                          progress=False, verify=False)
                    with torch.no_grad():
                        out = cm(prefill[:, :64]).logits.float()
                        q_dec = do_bench(lambda cm=cm: cm(decode), return_mode="median")
                        q_pre = do_bench(lambda cm=cm: cm(prefill), return_mode="median")
                except Exception as e:  # report and go on: the point is to see every recipe
                    print(f"{name:14s} FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                    continue
                fallbacks = sorted({str(w.message)[:160] for w in caught if "no Triton kernel" in str(w.message)})
            cos = torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0).item()
            split_notes = sorted({n.split(":")[0] for n in cm.report().notes if "16-bit columns" in n
                                  or "sparse residual" in n or "residual channels" in n})
            print(f"{name:14s} {cos:8.5f} {q_dec:9.3f} {q_pre:10.3f}  {fallbacks or '-'} {split_notes or ''}")
            del cm
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
