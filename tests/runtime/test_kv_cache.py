"""QuantizedKVCache and KVCacheSpec: validation, reference quantizers, Triton append == torch append."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from qcompile.formats.hadamard import hadamard_matrix, rotate  # noqa: E402
from qcompile.formats.kv import (  # noqa: E402
    KV_FORMATS,
    VALUE_TOKEN_BLOCK,
    KVCacheSpec,
    block_tokens,
    pack_bits,
    unblock_tokens,
    unpack_bits,
)
from qcompile.runtime.kv_cache import QuantizedKVCache  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_spec_validation_names_the_problem():
    with pytest.raises(ValueError, match="valid formats: bf16, fp8_e4m3, int8, int4, int2"):
        KVCacheSpec("int3")
    with pytest.raises(ValueError, match="value_format"):
        KVCacheSpec("int4", value_format="nvfp4")
    with pytest.raises(ValueError, match="power of two"):
        KVCacheSpec("int4", group_size=24)
    with pytest.raises(ValueError, match="multiple of group_size"):
        KVCacheSpec("int4", group_size=16, residual_length=24)
    with pytest.raises(ValueError, match="cannot be combined"):
        KVCacheSpec("int4", rotate_keys=True, pre_rope=True)
    assert KVCacheSpec("int4", group_size=32).residual_length == 32
    assert KVCacheSpec("fp8_e4m3").value_format == "fp8_e4m3"


def test_cache_rejects_bad_head_dim_and_overflow():
    with pytest.raises(ValueError, match="head_dim=96"):
        QuantizedKVCache(1, 1, 16, 1, 96, KVCacheSpec("int8"))
    with pytest.raises(ValueError, match="must divide head_dim"):
        QuantizedKVCache(1, 1, 16, 1, 32, KVCacheSpec("int4", value_group_size=64))
    c = QuantizedKVCache(1, 2, 8, 1, 16, KVCacheSpec("int8"), impl="torch")
    c.append(0, torch.randn(2, 1, 6, 16), torch.randn(2, 1, 6, 16))
    with pytest.raises(ValueError, match="append past max_seq_len"):
        c.append(0, torch.randn(2, 1, 3, 16), torch.randn(2, 1, 3, 16))
    with pytest.raises(ValueError, match="num_kv_heads=1"):
        c.append(0, torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16))
    with pytest.raises(IndexError, match="layer 3"):
        c.append(3, torch.randn(2, 1, 1, 16), torch.randn(2, 1, 1, 16))


def test_hadamard_is_orthogonal_and_keeps_logits():
    h = hadamard_matrix(64, torch.float64)
    torch.testing.assert_close(h @ h, torch.eye(64, dtype=torch.float64))
    q, k = torch.randn(5, 64, dtype=torch.float64), torch.randn(7, 64, dtype=torch.float64)
    torch.testing.assert_close(rotate(q) @ rotate(k).T, q @ k.T)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_matrix(48)


@pytest.mark.parametrize("bits", [4, 2])
def test_pack_roundtrip(bits):
    c = torch.randint(0, 1 << bits, (3, 5, 32))
    assert torch.equal(unpack_bits(pack_bits(c, bits), bits), c)


def _fill(cache, steps, gen, scale_ch=3):
    B, H, D = cache.batch, cache.num_kv_heads, cache.head_dim
    for T, nn in steps:
        k = torch.randn(B, H, T, D, generator=gen)
        k[..., scale_ch] *= 30.0
        v = torch.randn(B, H, T, D, generator=gen)
        # bf16-representable inputs: the residual ring then stores them exactly on every path
        cache.append(0, k.bfloat16().float().to(DEV), v.bfloat16().float().to(DEV), nn)


STEPS = [(21, [21, 5]), (3, [3, 1]), (19, [19, 12]), (1, [1, 1])]


@pytest.mark.parametrize("fmt", KV_FORMATS)
def test_dequantized_cache_is_close_to_input(fmt):
    gen = torch.Generator().manual_seed(0)
    spec = KVCacheSpec(fmt, group_size=8, residual_length=16)
    c = QuantizedKVCache(1, 2, 64, 2, 16, spec, impl="torch")
    ks, vs = [], []
    for T, nn in STEPS:
        k, v = torch.randn(2, 2, T, 16, generator=gen), torch.randn(2, 2, T, 16, generator=gen)
        c.append(0, k, v, nn)
        ks.append((k, nn))
        vs.append((v, nn))
    kd, vd = c.dequantize(0)
    tol = {"bf16": 1e-2, "fp8_e4m3": 0.07, "int8": 0.01, "int4": 0.15, "int2": 0.6}[fmt]
    for b in range(2):
        kk = torch.cat([k[b, :, :nn[b]] for k, nn in ks], 1)
        vv = torch.cat([v[b, :, :nn[b]] for v, nn in vs], 1)
        L = kk.shape[1]
        assert int(c.lengths[0, b]) == L
        assert ((kd[b, :, :L] - kk).norm() / kk.norm()) < tol
        assert ((vd[b, :, :L] - vv).norm() / vv.norm()) < tol
        assert kd[b, :, L:].abs().sum() == 0


@pytest.mark.parametrize("fmt", KV_FORMATS)
def test_triton_append_matches_torch_append(fmt):
    spec = KVCacheSpec(fmt, group_size=8, residual_length=16)
    caches = []
    for impl in ("torch", "triton"):
        c = QuantizedKVCache(1, 2, 64, 2, 16, spec, device=DEV, impl=impl)
        _fill(c, STEPS, torch.Generator().manual_seed(1))
        caches.append(c)
    a, b = (c.layer_tensors(0) for c in caches)
    for name, t in a.items():
        if t is None:
            continue
        if DEV == "cpu" or name.endswith("res") or t.dtype.is_floating_point:
            # Bit-exact on the interpreter; on the GPU scales may differ in the last ulp.
            torch.testing.assert_close(b[name].float().cpu(), t.float().cpu(), rtol=1e-3, atol=0,
                                       msg=f"{fmt}: {name} differs")
    ka, va = caches[0].dequantize(0)
    kb, vb = caches[1].dequantize(0)
    for ours, ref in ((kb.cpu(), ka.cpu()), (vb.cpu(), va.cpu())):
        if DEV == "cpu":
            torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3)
        else:  # a last-ulp scale difference can flip a rounding tie: a rare code, one step off
            off = (ours - ref).abs() > 1e-3 + 1e-3 * ref.abs()
            assert off.float().mean() <= 1e-3, f"{fmt}: {int(off.sum())} of {off.numel()} values differ"
    assert torch.equal(caches[0].lengths.cpu(), caches[1].lengths.cpu())


def test_block_tokens_roundtrip_and_layout():
    """Token-blocked value codes: [S, NB] -> [S_pad/TB, NB, TB] with byte j of token p at
    [p // TB, j, p % TB]; S padded up to a block."""
    tb = VALUE_TOKEN_BLOCK
    codes = torch.randint(0, 256, (2, 3, 37, 8), dtype=torch.uint8)
    blocked = block_tokens(codes)
    assert blocked.shape == (2, 3, (37 + tb - 1) // tb, 8, tb)
    assert torch.equal(unblock_tokens(blocked, 37), codes)
    assert int(blocked[1, 2, 33 // tb, 5, 33 % tb]) == int(codes[1, 2, 33, 5])


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8", "int4", "int2"])
def test_cache_stores_values_token_blocked(fmt):
    """Both append paths write the value codes in the token-blocked layout."""
    spec = KVCacheSpec(fmt, group_size=8, residual_length=16)
    for impl in ("torch", "triton"):
        c = QuantizedKVCache(1, 2, 50, 2, 16, spec, device=DEV, impl=impl)
        _fill(c, STEPS, torch.Generator().manual_seed(2))
        v = c.layer_tensors(0)["v"]
        assert v.shape[-1] == VALUE_TOKEN_BLOCK and v.shape[-3] == 64 // VALUE_TOKEN_BLOCK
        flat = unblock_tokens(v, 50)
        assert torch.equal(block_tokens(flat), v)
        assert flat[0, :, : int(c.lengths[0, 0])].abs().sum() > 0       # written where expected
        assert flat[0, :, int(c.lengths[0, 0]):].abs().sum() == 0


def _attention_error(spec, q, k, v):
    """Relative error of attention over ``spec``'s dequantized cache vs the exact keys/values."""
    from qcompile.codegen.attention.reference import reference_decode_attention
    B, H, S, D = k.shape
    c = QuantizedKVCache(1, B, S, H, D, spec, impl="torch")
    c.append(0, k, v)
    exact = QuantizedKVCache(1, B, S, H, D, KVCacheSpec("bf16"), impl="torch")
    exact.append(0, k, v)
    out, ref = reference_decode_attention(q, c, 0), reference_decode_attention(q, exact, 0)
    return ((out - ref).norm() / ref.norm()).item()


def test_accuracy_floors_and_rotation_on_outlier_keys():
    """What docs/benchmarks/kv-accuracy.md reads from its tables, at small size: per-token int8
    keys break on 30x outlier channels and the Hadamard rotation repairs them; with exact keys,
    the output error is the values' element-wise error (e4m3 about 0.026, 4-bit about 0.1)."""
    gen = torch.Generator().manual_seed(5)
    B, H, S, D = 1, 2, 512, 64
    k = torch.randn(B, H, S, D, generator=gen)
    k[..., [3, 17, 40]] *= 30.0
    v = torch.randn(B, H, S, D, generator=gen)
    q = torch.randn(B, 4, D, generator=gen) * 0.15
    k, v, q = k.bfloat16(), v.bfloat16(), q.bfloat16()
    plain = _attention_error(KVCacheSpec("int8"), q, k, v)
    rotated = _attention_error(KVCacheSpec("int8", rotate_keys=True), q, k, v)
    assert rotated < 0.5 * plain
    assert 0.015 < _attention_error(KVCacheSpec("bf16", value_format="fp8_e4m3"), q, k, v) < 0.04
    assert 0.06 < _attention_error(KVCacheSpec("bf16", value_format="int4"), q, k, v) < 0.15
