"""End to end on a GPU: compile transformers models on CUDA and check that the
quantized linears take the Triton path (no fallback warning), stay accurate, and that the
compiled forward is not slower than the bf16 model it came from.

Per recipe: a Llama-shaped model (2 layers, hidden 4096, intermediate 14336,
bf16, random weights) compiled on CUDA; logits cosine to bf16; whether any
linear fell back to the reference kernel (the op warns once per combination);
and the median forward time against the bf16 model (Hugging Face, eager) for one token and
for a 512-token prefill, measured in the same run, three ways:

- ``eager``: the lowered graph op by op (``cm.cuda_graphs = False``);
- ``graph``: the default, each call shape captured once as a CUDA graph and replayed;
- ``tc+graph``: ``cm.compile_forward = True``, the graph through ``torch.compile`` before the capture.

    python benchmarks/check_compile_gpu.py   # on the device machine
    python benchmarks/check_compile_gpu.py --recipes none,w4a16 --json $OUT/compile.json
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch
import transformers as tf
from profiling import kernel_times, top_kernels
from triton.testing import do_bench

import qcompile

RECIPES = ["none", "w8a16", "w4a16", "fp8", "nvfp4-w4a16", "w4a8"]
MODES = ("eager", "graph", "tc+graph")


def timed(cm, ids, mode: str) -> float:
    cm.cuda_graphs = mode != "eager"
    cm.compile_forward = mode == "tc+graph"
    for _ in range(3):
        cm(ids)
    return do_bench(lambda: cm(ids), return_mode="median")


def kernel_lines(fn, calls: int = 3, top: int = 8) -> list[str]:
    """The ``top`` kernels by GPU time per call of ``fn`` (``benchmarks/profiling.py``), as printable lines."""
    fn()
    torch.cuda.synchronize()
    times = kernel_times(lambda: [fn() for _ in range(calls)])
    total = sum(sum(v) for v in times.values()) / calls
    return [f"   kernels {total:8.1f} us/call in all"] + [f"   {us:8.1f} us {c:4.0f}x {n[:90]}"
                                                         for us, c, n in top_kernels(times, calls, top)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--profile", action="store_true", help="top kernels of the 512-token forward, per recipe")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
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
    modes = args.modes.split(",")
    if args.profile:
        with torch.no_grad():
            print("bf16 model, 512 tokens:", *kernel_lines(lambda: model(prefill, use_cache=False)), sep="\n")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "bf16_1tok_ms": t_dec,
           "bf16_512tok_ms": t_pre, "rows": []}
    print(f"{res['device']} torch {torch.__version__}; bf16 model (eager): 1 token {t_dec:.3f} ms, "
          f"512 tokens {t_pre:.3f} ms")
    print(f"{'recipe':12s} {'cosine':>8s} {'fallbacks':>9s} {'mode':>9s} {'1-tok ms':>9s} {'x bf16':>7s} "
          f"{'512-tok ms':>10s} {'x bf16':>7s}")
    for name in args.recipes.split(","):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cm = qcompile.compile(model, example, target="hopper", recipe=name, progress=False, verify=False)
            with torch.no_grad():
                ref = model(prefill[:, :64], use_cache=False).logits.float()
                out = cm(prefill[:, :64]).logits.float()
            fallbacks = [str(w.message) for w in caught if "no Triton kernel" in str(w.message) or "unavailable" in str(w.message)]
        cos = torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0).item()
        for mode in modes:
            try:
                q_dec, q_pre = timed(cm, decode, mode), timed(cm, prefill, mode)
            except Exception as e:  # noqa: BLE001 - a failing mode is reported, the others still run
                print(f"{name:12s} {mode}: {type(e).__name__}: {str(e)[:200]}")
                res["rows"].append({"recipe": name, "mode": mode, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                continue
            res["rows"].append({"recipe": name, "mode": mode, "cosine": cos, "fallbacks": len(fallbacks),
                                "ms_1tok": q_dec, "ms_512tok": q_pre})
            print(f"{name:12s} {cos:8.5f} {len(fallbacks):9d} {mode:>9s} {q_dec:9.3f} {q_dec / t_dec:7.2f} "
                  f"{q_pre:10.3f} {q_pre / t_pre:7.2f}", flush=True)
        for f in fallbacks:
            print("   fallback:", f)
        if args.profile:
            cm.cuda_graphs, cm.compile_forward = True, False
            print(f"{name}, 512 tokens (graph):", *kernel_lines(lambda cm=cm: cm(prefill)), sep="\n")
        del cm
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
