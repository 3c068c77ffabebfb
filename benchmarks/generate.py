"""End-to-end generation on a GPU: qcompile's generate against Hugging Face in the same run.

A Llama-3-8B-shaped model (32 layers, hidden 4096, intermediate 14336, 32/8 heads, vocabulary
128256, random bf16 weights), a prompt of ``--prompt`` tokens and ``--new`` generated tokens per
row, at each batch size of ``--batches``. Rows:

- Hugging Face ``generate``, eager, dynamic cache (batch 1 only: it is slow);
- the anchor: Hugging Face's model with a static cache and one decode step captured in a CUDA graph
  by hand (step time of the replay at the prompt's end);
- qcompile: ``compile(model, recipe=R, kv_cache=C)`` then ``cm.generate`` (decode step captured in a
  CUDA graph): time to first token (the prompt's prefill) and decode tokens/s;
- the bandwidth floors: measured copy bandwidth over the bytes one decode step must read (weights,
  plus the cache at the final length).

    python benchmarks/generate.py                            # every row (on the device machine)
    python benchmarks/generate.py --layers 4 --batches 1 --new 32 --configs none,w4a16:int4
    python benchmarks/generate.py --json $OUT/generate.json  # raw numbers
    python benchmarks/generate.py --memory-context 32768     # plus peak memory at 32k context
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
import transformers as tf
from profiling import kernel_times, top_kernels
from triton.testing import do_bench

import qcompile
from qcompile.runtime.decoder import CachedDecoder

CONFIGS = ("none", "w4a16", "w4a16:int4", "fp8:fp8")
"""``recipe[:kv cache][+tc][+head]``: no cache format means uncompressed (``DenseKVCache``, masked
SDPA; ``:bf16`` is the same bytes through the Triton decode kernel); ``+tc``: the decode step through
``torch.compile`` before its capture (``CachedDecoder(compile_step=True)``); ``+head``: the LM head
quantized too, with the recipe's weight format (``overrides={"lm_head": ...}``; recipes keep it 16-bit)."""


def model_8b(layers: int) -> torch.nn.Module:
    cfg = tf.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=65536,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return tf.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def copy_bandwidth() -> float:
    x = torch.empty(1024 ** 3 // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() * 2 / (ms * 1e-3)


def hf_eager_tokps(model, ids, new: int) -> float:
    def run(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t
    run(2)
    return (new - 1) / (run(new) - run(1))


def hf_static_graph_ms(model, ids, max_len: int) -> float:
    """One decode step of Hugging Face's model on a static cache, captured in a CUDA graph by hand."""
    cache = tf.StaticCache(config=model.config, max_cache_len=max_len)
    B, T = ids.shape
    model(ids, past_key_values=cache, cache_position=torch.arange(T, device="cuda"), use_cache=True)
    tok = torch.zeros(B, 1, dtype=torch.long, device="cuda")
    cp = torch.tensor([T], device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            model(tok, past_key_values=cache, cache_position=cp, use_cache=True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        model(tok, past_key_values=cache, cache_position=cp, use_cache=True)
    ms = do_bench(g.replay, return_mode="median")
    del g, cache
    return ms


def step_bytes(model, cm, decoder, batch: int, length: int) -> int:
    """Bytes one decode step reads at least: the compiled weights (embedding: one row a token) and the
    cache at ``length`` tokens per row."""
    state = (cm.graph_module if cm is not None else model).state_dict()
    emb = model.model.embed_tokens.weight
    weights = sum(t.numel() * t.element_size() for t in state.values()) - emb.numel() * emb.element_size()
    if decoder is None or decoder.cache is None:
        kv = 2 * model.config.num_hidden_layers * batch * model.config.num_key_value_heads * 128 * length * 2
    else:
        kv = decoder.cache.nbytes() * length // decoder.cache.max_seq_len
    return weights + kv


KERNEL_KINDS = (("gemm", ("int_mma", "weight_only", "gemm", "gemv", "cublas", "nvjet", "xmma", "cutlass", "splitk",
                          "w4a8", "fp8_", "act_quant")),
                ("attention", ("attention", "decode", "append", "flash", "sdpa", "merge")),
                ("other", ("",)))


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next(kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys))


def profile_decode(cm, decoder, ids: torch.Tensor, new: int, steps: int = 8) -> dict:
    """GPU time of ``steps`` captured decode steps by kernel kind (``torch.profiler``): kernels per step,
    the GEMM / attention / other shares, and the gap (wall time minus the kernels' sum)."""
    B, T = ids.shape
    cm.generate(ids, 3, max_length=T + new)            # prefill, capture; the cache holds T + 3 tokens per row
    token = torch.zeros(B, dtype=torch.long, device=ids.device)
    position = torch.full((B,), T + 3, dtype=torch.long, device=ids.device)
    decoder.decode_step(token, position)
    torch.cuda.synchronize()
    t = time.perf_counter()
    by_name = kernel_times(lambda: [decoder.decode_step(token, position + 1 + i) for i in range(steps)])
    wall_us = (time.perf_counter() - t) * 1e6
    by_kind: dict[str, float] = {}
    for name, times in by_name.items():
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + sum(times) / steps
    kernel_us = sum(by_kind.values())
    return {"kernels_per_step": sum(len(v) for v in by_name.values()) / steps, "step_us": wall_us / steps,
            "kernel_us_per_step": kernel_us, "gap_us_per_step": wall_us / steps - kernel_us, "by_kind_us": by_kind,
            "top": [{"us": us, "calls": c, "name": n[:120]} for us, c, n in top_kernels(by_name, steps, 25)]}


def profile_prefill(cm, ids: torch.Tensor) -> dict:
    """GPU time of one prefill (``generate(ids, 1)``) by kernel kind, and the gap: wall time minus the
    kernels' sum (host dispatch the GPU waits for, the prefill being eager)."""
    cm.generate(ids, 1)
    torch.cuda.synchronize()
    t = time.perf_counter()
    by_name = kernel_times(lambda: cm.generate(ids, 1))
    wall_us = (time.perf_counter() - t) * 1e6
    by_kind: dict[str, float] = {}
    for name, times in by_name.items():
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + sum(times)
    kernel_us = sum(by_kind.values())
    return {"kernels": sum(len(v) for v in by_name.values()), "wall_us": wall_us, "kernel_us": kernel_us,
            "gap_us": wall_us - kernel_us, "by_kind_us": by_kind,
            "top": [{"us": us, "calls": c, "name": n[:120]} for us, c, n in top_kernels(by_name, 1, 15)]}


def parse_config(config: str) -> tuple[str, str | None, bool, bool]:
    """``recipe[:kv][+tc][+head]`` as (recipe, kv cache, torch.compile step, quantized LM head)."""
    spec, *flags = config.split("+")
    recipe, _, kv = spec.partition(":")
    unknown = set(flags) - {"tc", "head"}
    if unknown:
        raise ValueError(f"config {config!r}: unknown flags {sorted(unknown)} (known: +tc, +head)")
    return recipe, kv or None, "tc" in flags, "head" in flags


def compile_model(model, recipe: str, head: bool):
    overrides = {"lm_head": qcompile.recipes.get_recipe(recipe).weight.short()} if head else None
    example = torch.randint(0, 32000, (2, 16), device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qcompile.compile(model, example, target="hopper", recipe=recipe, progress=False, verify=False,
                                overrides=overrides)


def long_context_row(decoder, batch: int, context: int, steps: int = 16) -> dict:
    """Decode tokens/s at ``context`` tokens per row: the cache's lengths are set to ``context`` without a
    prefill (its contents are whatever the storage holds: the time does not depend on the values)."""
    cache = decoder.allocate(batch, context + steps + 2)
    cache.lengths.fill_(context)
    cache.advance_bounds(context)
    token = torch.zeros(batch, dtype=torch.long, device="cuda")
    position = torch.full((batch,), context, dtype=torch.long, device="cuda")
    decoder.decode_step(token, position)                  # capture
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(steps):
        decoder.decode_step(token, position + 1 + i)
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t) * 1e3 / steps
    return {"batch": batch, "context": context, "step_ms": step_ms, "tokps": 1e3 * batch / step_ms,
            "cache_gib": cache.nbytes() / 2 ** 30}


def qcompile_rows(model, config: str, cm, compile_s: float, batches: list[int], prompt: int, new: int, bw: float,
                  memory_context: int = 0, profile: bool = False, prefill_tokens: int = 0,
                  long_context: tuple[int, int] | None = None) -> list[dict]:
    _, kv, tc, _ = parse_config(config)
    t = time.perf_counter()
    decoder = CachedDecoder(cm, kv, compile_step=tc)
    cm._decoder = decoder
    graph_s = time.perf_counter() - t
    rows = []
    for b in batches:
        ids = torch.randint(0, 32000, (b, prompt), device="cuda")
        t = time.perf_counter()
        cm.generate(ids, 3, max_length=prompt + new)                  # capture, compile kernels
        warm_s = time.perf_counter() - t
        out, stats = cm.generate(ids, new, return_stats=True, max_length=prompt + new)
        floor = bw / step_bytes(model, cm, decoder, b, prompt + new // 2)
        rows.append({"config": config, "batch": b, "ttft_ms": stats.prefill_s * 1e3,
                     "tokps": stats.tokens_per_s, "step_ms": 1e3 * stats.decode_s / max(1, new - 1),
                     "floor_steps_per_s": floor, "compile_s": compile_s, "generation_graph_s": graph_s, "warm_s": warm_s,
                     "paths": dict(decoder.binding.paths)})
        print(json.dumps(rows[-1]), flush=True)
        if profile and b == batches[0]:
            rows[-1]["profile"] = profile_decode(cm, decoder, ids, new)
            print(json.dumps(rows[-1]["profile"]), flush=True)
    if prefill_tokens:
        ids = torch.randint(0, 32000, (1, prefill_tokens), device="cuda")
        cm.generate(ids, 1)
        _, stats = cm.generate(ids, 1, return_stats=True)
        rows.append({"config": config, "batch": 1, "prefill_tokens": prefill_tokens, "ttft_ms": stats.prefill_s * 1e3})
        if profile:
            rows[-1]["prefill_profile"] = profile_prefill(cm, ids)
        print(json.dumps(rows[-1]), flush=True)
    if long_context:
        rows.append({"config": config, **long_context_row(decoder, *long_context)})
        print(json.dumps(rows[-1]), flush=True)
    if memory_context:
        decoder.cache = None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, 32000, (1, memory_context - 8), device="cuda")
        cm.generate(ids, 8, prefill_chunk_size=2048)
        rows.append({"config": config, "batch": 1, "context": memory_context,
                     "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
                     "cache_gib": decoder.cache.nbytes() / 2 ** 30})
        print(json.dumps(rows[-1]), flush=True)
    decoder.cache = None
    del decoder
    cm._decoder = None
    torch.cuda.empty_cache()
    return rows


def hf_prefill_ms(model, tokens: int) -> float:
    ids = torch.randint(0, 32000, (1, tokens), device="cuda")
    return do_bench(lambda: model(ids, use_cache=False), warmup=2, rep=10, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face rows")
    ap.add_argument("--hf-prefill-only", action="store_true", help="of the Hugging Face rows, only the prefill")
    ap.add_argument("--memory-context", type=int, default=0, metavar="T",
                    help="also the peak GPU memory of a batch-1 generation at T tokens of context (e.g. 32768)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile the prefill and 8 decode steps at the first batch size (kernel kinds, top kernels)")
    ap.add_argument("--prefill-tokens", type=int, default=0, metavar="T",
                    help="also the time to first token of one T-token prompt (e.g. 2048), and Hugging Face's forward")
    ap.add_argument("--long-context", default="", metavar="B,T",
                    help="also decode tokens/s at batch B with T tokens of context per row (e.g. 32,8192)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    batches = [int(b) for b in args.batches.split(",")]
    model = model_8b(args.layers)
    bw = copy_bandwidth()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": tf.__version__,
           "layers": args.layers, "prompt": args.prompt, "new": args.new, "copy_TBps": bw / 1e12, "rows": []}
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}), flush=True)
    with torch.no_grad():
        if not args.no_hf and not args.hf_prefill_only:
            ids = torch.randint(0, 32000, (1, args.prompt), device="cuda")
            res["hf_eager_tokps_b1"] = hf_eager_tokps(model, ids, 32)
            for b in batches:
                ids = torch.randint(0, 32000, (b, args.prompt), device="cuda")
                ms = hf_static_graph_ms(model, ids, args.prompt + args.new)
                res["rows"].append({"config": "hf-static-graph", "batch": b, "step_ms": ms, "tokps": 1e3 * b / ms,
                                    "floor_steps_per_s": bw / step_bytes(model, None, None, b, args.prompt)})
                print(json.dumps(res["rows"][-1]), flush=True)
            print(json.dumps({"hf_eager_tokps_b1": res["hf_eager_tokps_b1"]}), flush=True)
        if args.prefill_tokens and not args.no_hf:
            res["hf_prefill_ms"] = hf_prefill_ms(model, args.prefill_tokens)
            print(json.dumps({"hf_prefill_ms": res["hf_prefill_ms"], "tokens": args.prefill_tokens}), flush=True)
        long_context = tuple(int(v) for v in args.long_context.split(",")) if args.long_context else None
        configs = args.configs.split(",")
        groups: dict[tuple[str, bool], list[str]] = {}
        for config in configs:
            recipe, _, _, head = parse_config(config)
            groups.setdefault((recipe, head), []).append(config)
        for (recipe, head), members in groups.items():   # one compile() per recipe, a decoder per config
            t = time.perf_counter()
            cm = compile_model(model, recipe, head)
            compile_s = time.perf_counter() - t
            for config in members:
                try:
                    res["rows"] += qcompile_rows(model, config, cm, compile_s, batches, args.prompt, args.new, bw,
                                                 args.memory_context, args.profile, args.prefill_tokens, long_context)
                except Exception as e:  # noqa: BLE001 - a failing row is reported, the others still run
                    res["rows"].append({"config": config, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                    print(json.dumps(res["rows"][-1]), flush=True)
            del cm
            torch.cuda.empty_cache()
    print(f"\n{res['device']}, torch {res['torch']}, transformers {res['transformers']}, {args.layers} layers, "
          f"prompt {args.prompt}, {args.new} new; copy {bw / 1e12:.2f} TB/s; HF eager b1 "
          f"{res.get('hf_eager_tokps_b1', float('nan')):.1f} tok/s")
    print(f"{'config':18s} {'batch':>5s} {'TTFT ms':>8s} {'step ms':>8s} {'tok/s':>8s} {'floor tok/s':>11s}")
    for r in res["rows"]:
        if "error" in r:
            print(f"{r['config']:18s} ERROR {r['error']}")
            continue
        if "peak_gib" in r:
            print(f"{r['config']:18s} context {r['context']}: peak {r['peak_gib']:.1f} GiB, cache {r['cache_gib']:.2f} GiB")
            continue
        if "prefill_tokens" in r:
            print(f"{r['config']:18s} prefill {r['prefill_tokens']} tokens: {r['ttft_ms']:.1f} ms "
                  f"(HF forward {res.get('hf_prefill_ms', float('nan')):.1f} ms)")
            continue
        if "context" in r:
            print(f"{r['config']:18s} batch {r['batch']} at {r['context']} context: {r['step_ms']:.2f} ms/step, "
                  f"{r['tokps']:.1f} tok/s, cache {r['cache_gib']:.1f} GiB")
            continue
        print(f"{r['config']:18s} {r['batch']:5d} {r.get('ttft_ms', float('nan')):8.1f} {r['step_ms']:8.2f} "
              f"{r['tokps']:8.1f} {r['floor_steps_per_s'] * r['batch']:11.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
