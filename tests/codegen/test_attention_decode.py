"""Triton decode attention over the compressed KV cache, against the float64 reference.

Runs on CPU under TRITON_INTERPRET=1 (tiny shapes), on the GPU when there is one.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from qcompile.codegen.attention import decode_attention, reference_decode_attention  # noqa: E402
from qcompile.formats.hadamard import rotate  # noqa: E402
from qcompile.formats.kv import KV_FORMATS, KVCacheSpec, apply_rope  # noqa: E402
from qcompile.runtime import DecodeWorkspace, QuantizedKVCache, prefill_attention  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def filled_cache(spec, gen, B=2, Hkv=2, D=32, S=96, steps=((45, [45, 17]), (3, [3, 3]))):
    c = QuantizedKVCache(1, B, S, Hkv, D, spec, device=DEV, impl="triton")
    for T, nn in steps:
        k = torch.randn(B, Hkv, T, D, generator=gen)
        k[..., 5] *= 25.0                      # an outlier channel
        v = torch.randn(B, Hkv, T, D, generator=gen)
        c.append(0, k.to(DEV), v.to(DEV), nn)
    return c


def run_decode(c, q, **kw):
    out = torch.full_like(q, float("nan"))     # poisoned: every element must be written
    decode_attention(q, c, 0, impl="triton", out=out, **kw)
    assert torch.isfinite(out).all()
    return out


VARIANTS = [dict(), dict(rotate_keys=True), dict(pre_rope=True)]


@pytest.mark.parametrize("fmt", KV_FORMATS)
@pytest.mark.parametrize("variant", VARIANTS, ids=["plain", "rot", "prerope"])
def test_decode_matches_fp64_reference(fmt, variant):
    gen = torch.Generator().manual_seed(hash((fmt, str(variant))) % 2**31)
    spec = KVCacheSpec(fmt, group_size=16, residual_length=32, **variant)
    c = filled_cache(spec, gen)
    # T=3 query tokens (speculative decoding): the last three appended tokens of each row.
    q = torch.randn(2, 4, 3, 32, generator=gen).bfloat16().to(DEV)
    out = run_decode(c, q)
    assert rel(out, reference_decode_attention(q, c, 0)) < 1e-2


@pytest.mark.parametrize("spec", [
    KVCacheSpec("int4", group_size=16, value_group_size=8),
    KVCacheSpec("int2", group_size=8, residual_length=24, value_format="fp8_e4m3"),
    KVCacheSpec("int8", value_format="int4"),
], ids=lambda s: s.short())
def test_decode_mixed_formats_and_groups(spec):
    gen = torch.Generator().manual_seed(7)
    c = filled_cache(spec, gen, D=16, steps=((30, [30, 9]), (1, [1, 1]), (8, [8, 2])))
    q = torch.randn(2, 4, 16, generator=gen).half().to(DEV)       # [B, Hq, D], one token
    out = run_decode(c, q)
    assert out.shape == q.shape
    assert rel(out, reference_decode_attention(q, c, 0)) < 1e-2


@pytest.mark.parametrize("unpack", ["auto", "generic"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reduce-kernel"])
def test_splits_gqa_and_query_tokens(unpack, fused):
    gen = torch.Generator().manual_seed(3)
    spec = KVCacheSpec("int4", group_size=16)
    c = filled_cache(spec, gen, Hkv=1)
    q = torch.randn(2, 1, 8, 32, generator=gen).bfloat16().to(DEV)   # no GQA, T = 8
    ref = reference_decode_attention(q, c, 0)
    outs = [run_decode(c, q, num_splits=n, unpack=unpack, fused_reduce=fused) for n in (1, 3)]
    for o in outs:
        assert rel(o, ref) < 1e-2
    assert rel(outs[0], outs[1]) < 1e-2


FAST_SPECS = [
    KVCacheSpec("int4", group_size=32, residual_length=32),
    KVCacheSpec("int4", group_size=32, residual_length=64, rotate_keys=True),
    KVCacheSpec("int2", group_size=16, residual_length=32),
    KVCacheSpec("int2", group_size=32, residual_length=32, rotate_keys=True),
    KVCacheSpec("fp8_e4m3"),
    KVCacheSpec("int8", rotate_keys=True),
    KVCacheSpec("bf16"),
    KVCacheSpec("int4", value_format="fp8_e4m3", group_size=16),
    KVCacheSpec("fp8_e4m3", value_format="int2"),
    KVCacheSpec("int8", value_format="int4", value_group_size=16),
]


@pytest.mark.parametrize("spec", FAST_SPECS, ids=lambda s: s.short())
@pytest.mark.parametrize("block_n", [16, 32])
def test_fast_paths_head_dim_64(spec, block_n):
    """Head dim 64 reaches every packed fast path (int2 needs D/4 >= 16); tiles smaller than a
    key group (several tiles per group); GQA 4 with T = 2; the fast path against the generic one
    and both against the float64 reference."""
    gen = torch.Generator().manual_seed(11)
    c = filled_cache(spec, gen, B=2, Hkv=2, D=64, S=160,
                     steps=((77, [77, 40]), (1, [1, 1]), (2, [2, 2])))
    q = torch.randn(2, 8, 2, 64, generator=gen).bfloat16().to(DEV)
    ref = reference_decode_attention(q, c, 0)
    fast = run_decode(c, q, block_n=block_n, num_splits=2)
    generic = run_decode(c, q, block_n=block_n, num_splits=2, unpack="generic")
    assert rel(fast, ref) < 1e-2
    assert rel(generic, ref) < 1e-2
    assert rel(fast, generic) < 1e-2


def test_fast_paths_are_taken():
    """The head-dim-64 specs above do reach the fast paths; the generic ones are where expected."""
    from qcompile.codegen.attention.launch import kernel_paths
    for spec in FAST_SPECS[:6]:
        assert kernel_paths(spec, 64, 16) == (True, True), spec.short()
    assert kernel_paths(KVCacheSpec("int2"), 32, 16) == (False, False)          # D/4 < 16
    assert kernel_paths(KVCacheSpec("int4", pre_rope=True), 128, 64)[0] is False
    assert kernel_paths(KVCacheSpec("int4", value_group_size=32), 128, 64) == (True, False)
    assert kernel_paths(KVCacheSpec("int4", group_size=16), 128, 32)[0] is False  # group < tile
    assert kernel_paths(KVCacheSpec("int8"), 128, 64, unpack="generic") == (False, False)


def test_fused_reduce_leaves_tickets_zero():
    gen = torch.Generator().manual_seed(13)
    c = filled_cache(KVCacheSpec("fp8_e4m3"), gen)
    q = torch.randn(2, 4, 32, generator=gen).bfloat16().to(DEV)
    ws = DecodeWorkspace(DEV)
    run_decode(c, q, num_splits=3, fused_reduce=True, workspace=ws)
    assert ws.tickets.numel() >= 2 * 2
    assert int(ws.tickets.abs().sum()) == 0


def test_many_splits_merge_in_a_second_kernel():
    """41 splits (two chunks of the reduce kernel at D=128): by default they merge in the second
    kernel, which never reads the tickets; poisoned tickets would leave a fused merge undone
    (NaN output). Fused and separate merges agree (the fused run also passes a register cap,
    which only the GPU compiler reads)."""
    from qcompile.codegen.attention.launch import FUSED_MERGE_MAX_SPLITS
    gen = torch.Generator().manual_seed(14)
    c = filled_cache(KVCacheSpec("fp8_e4m3"), gen, B=1, Hkv=1, D=128, S=700, steps=((650, [650]),))
    q = torch.randn(1, 2, 128, generator=gen).bfloat16().to(DEV)
    ref = reference_decode_attention(q, c, 0)
    assert FUSED_MERGE_MAX_SPLITS < 41
    ws = DecodeWorkspace(DEV).reserve(heads=1)
    ws.tickets.fill_(1000)
    auto = run_decode(c, q, num_splits=41, block_n=16, workspace=ws)
    ws.tickets.zero_()
    fused = run_decode(c, q, num_splits=41, block_n=16, fused_reduce=True, maxnreg=128, workspace=ws)
    assert rel(auto, ref) < 1e-2
    assert rel(fused, ref) < 1e-2
    assert rel(auto, fused) < 1e-3


def test_launch_config_fills_one_wave():
    """Default splits: the compressed one-warp programs fit one wave of 8 (int4/int2) or 4
    (fp8/int8) per SM; a batch with more heads than that gets one split; no split shorter than
    ``MIN_SPLIT_TOKENS`` (or a tile)."""
    from qcompile.codegen.attention.launch import MIN_SPLIT_TOKENS, launch_config
    sms = 132
    for spec, per_sm in ((KVCacheSpec("int4"), 8), (KVCacheSpec("int2"), 8),
                         (KVCacheSpec("int4", rotate_keys=True), 8), (KVCacheSpec("fp8_e4m3"), 4),
                         (KVCacheSpec("int8"), 4)):
        for B, ctx in ((1, 8192), (8, 8192), (32, 4096), (8, 32768), (1, 131072), (256, 4096)):
            cfg = launch_config(spec, 128, B, 8, ctx, sms)
            assert cfg.num_warps == 1
            assert 1 <= cfg.num_splits <= max(1, sms * per_sm // (B * 8))
            shortest = max(MIN_SPLIT_TOKENS, cfg.block_n)
            assert (cfg.num_splits - 1) * shortest < ctx
            if sms * per_sm >= B * 8 and ctx >= shortest * sms * per_sm // (B * 8):
                assert cfg.num_splits == sms * per_sm // (B * 8)
    assert launch_config(KVCacheSpec("bf16"), 128, 8, 8, 8192, sms).num_warps == 4


def test_row_shorter_than_its_splits():
    """A row whose length ends before some splits start (those splits are empty) and a row with
    only residual tokens."""
    gen = torch.Generator().manual_seed(12)
    spec = KVCacheSpec("int4", group_size=16, residual_length=16)
    c = filled_cache(spec, gen, B=2, Hkv=2, D=32, S=128, steps=((100, [100, 9]), (1, [1, 1])))
    q = torch.randn(2, 4, 32, generator=gen).bfloat16().to(DEV)
    out = run_decode(c, q, num_splits=4, block_n=16)
    assert rel(out, reference_decode_attention(q, c, 0)) < 1e-2


def test_torch_impl_matches_reference():
    gen = torch.Generator().manual_seed(4)
    c = filled_cache(KVCacheSpec("fp8_e4m3", rotate_keys=True), gen)
    q = torch.randn(2, 4, 32, generator=gen).bfloat16().to(DEV)
    out = decode_attention(q, c, 0, impl="torch")
    assert rel(out, reference_decode_attention(q, c, 0)) < 1e-2


def test_prefill_uses_sdpa_and_writes_cache():
    gen = torch.Generator().manual_seed(5)
    B, Hq, Hkv, T, D = 2, 4, 2, 24, 32
    spec = KVCacheSpec("int8", pre_rope=True)
    c = QuantizedKVCache(1, B, 40, Hkv, D, spec, device=DEV, impl="triton")
    q = torch.randn(B, Hq, T, D, generator=gen).to(DEV)
    k = torch.randn(B, Hkv, T, D, generator=gen).to(DEV)
    v = torch.randn(B, Hkv, T, D, generator=gen).to(DEV)
    out = prefill_attention(q, k, v, c, 0, [T, 10])
    kr = apply_rope(k, torch.arange(T, device=DEV), spec.rope_theta)
    ref = F.scaled_dot_product_attention(q, kr.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                         is_causal=True)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1, :, :10], ref[1, :, :10], rtol=1e-4, atol=1e-4)
    assert c.lengths[0].tolist() == [T, 10]
    kd, _ = c.dequantize(0)
    assert rel(kd[0, :, :T], k[0]) < 1e-2                              # stored before RoPE



def test_chunked_prefill_onto_a_non_empty_layer_equals_one_block():
    gen = torch.Generator().manual_seed(6)
    B, Hq, Hkv, T, D = 2, 4, 2, 24, 32
    for spec in (KVCacheSpec("int8", pre_rope=True), KVCacheSpec("int4", group_size=8, rotate_keys=True)):
        q = torch.randn(B, Hq, T, D, generator=gen).to(DEV)
        k = torch.randn(B, Hkv, T, D, generator=gen).to(DEV)
        v = torch.randn(B, Hkv, T, D, generator=gen).to(DEV)
        chunked = QuantizedKVCache(1, B, 40, Hkv, D, spec, device=DEV)
        first = prefill_attention(q[:, :, :10], k[:, :, :10], v[:, :, :10], chunked, 0)
        rest = prefill_attention(q[:, :, 10:], k[:, :, 10:], v[:, :, 10:], chunked, 0)
        assert chunked.lengths[0].tolist() == [T, T]
        kr = apply_rope(k, torch.arange(T, device=DEV), spec.rope_theta) if spec.pre_rope else k
        ref = F.scaled_dot_product_attention(q, kr.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
        assert rel(first, ref[:, :, :10]) < 1e-5                          # the first block: exact SDPA
        kd, vd = chunked.dequantize(0)                                     # the rest reads the compressed cache
        kd = apply_rope(kd, torch.arange(40, device=DEV), spec.rope_theta) if spec.pre_rope else kd
        qd = rotate(q) if spec.rotate_keys else q
        on_cache = F.scaled_dot_product_attention(qd, kd[:, :, :T].repeat_interleave(2, 1),
                                                  vd[:, :, :T].repeat_interleave(2, 1), is_causal=True)
        assert rel(rest, on_cache[:, :, 10:]) < 1e-5
        assert rel(rest, ref[:, :, 10:]) < (3e-2 if spec.key_format == "int8" else 0.15)


def test_decode_rejects_bad_inputs():
    c = QuantizedKVCache(1, 2, 16, 2, 16, KVCacheSpec("int8"), device=DEV)
    c.append(0, torch.randn(2, 2, 4, 16, device=DEV), torch.randn(2, 2, 4, 16, device=DEV))
    with pytest.raises(ValueError, match="1..8 query tokens"):
        decode_attention(torch.randn(2, 4, 9, 16, device=DEV).bfloat16(), c, 0)
    with pytest.raises(ValueError, match="head_dim=16"):
        decode_attention(torch.randn(2, 4, 32, device=DEV).bfloat16(), c, 0)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        decode_attention(torch.randn(2, 3, 16, device=DEV).bfloat16(), c, 0)
    with pytest.raises(ValueError, match="unknown impl"):
        decode_attention(torch.randn(2, 4, 16, device=DEV).bfloat16(), c, 0, impl="cuda")
    with pytest.raises(ValueError, match="unknown unpack"):
        decode_attention(torch.randn(2, 4, 16, device=DEV).bfloat16(), c, 0, impl="triton",
                         unpack="join")
    with pytest.raises(ValueError, match="sm_scale"):
        decode_attention(torch.randn(2, 4, 16, device=DEV).bfloat16(), c, 0, sm_scale=-1.0)
    with pytest.raises(ValueError, match="block_n"):
        decode_attention(torch.randn(2, 4, 16, device=DEV).bfloat16(), c, 0, impl="triton",
                         block_n=24)
