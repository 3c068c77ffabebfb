"""A static, preallocated, compressed KV cache (per layer, GQA aware, per-row lengths).

    cache = QuantizedKVCache(num_layers, batch, max_seq_len, num_kv_heads, head_dim,
                             KVCacheSpec("int4", rotate_keys=True), device="cuda")
    cache.append(layer, k, v)                    # k, v: [B, Hkv, T, D]; quantized on append
    out = decode_attention(q, cache, layer)      # qcompile.codegen.attention

Layouts are described in ``qcompile.formats.kv``. Appends run the Triton
quantize-on-append kernels on CUDA (or anywhere with ``impl="triton"`` under
``TRITON_INTERPRET=1``) and a torch reference otherwise; both write the same layout.
"""

from __future__ import annotations

import contextlib

import torch

from qcompile.formats.hadamard import rotate
from qcompile.formats.kv import (
    GROUPED_FORMATS,
    KV_BITS,
    PER_TOKEN_FORMATS,
    VALUE_TOKEN_BLOCK,
    KVCacheSpec,
    channel_major,
    dequantize_per_token,
    pack_bits,
    padded_tokens,
    quantize_asym,
    quantize_per_token,
    slice_major,
    unblock_tokens,
    unpack_bits,
)

IMPLS = ("auto", "triton", "torch")


class HostLengthBounds:
    """A host-side upper bound of each layer's longest row, so that launches and overflow checks
    need no device sync; a captured CUDA graph advances the device lengths without Python, so the
    runtime then advances the bounds itself (:meth:`advance_bounds`) and captures under
    :meth:`full_bounds` (kernels sized for the whole static length, no host checks)."""

    num_layers: int
    max_seq_len: int

    def _init_bounds(self) -> None:
        self._len_bound = [0] * self.num_layers
        self._checking = True

    def max_length_bound(self, layer: int) -> int:
        """An upper bound of the longest row of ``layer``, known without a device sync."""
        return self._len_bound[layer]

    def advance_bounds(self, tokens: int) -> None:
        """Every layer grew by at most ``tokens`` per row (a replayed CUDA graph appended them)."""
        self._len_bound = [min(b + tokens, self.max_seq_len) for b in self._len_bound]

    def _past_bound(self, layer: int, tokens: int) -> bool:
        """Whether appending ``tokens`` may overflow ``layer`` (then the caller syncs and checks)."""
        return self._checking and self._len_bound[layer] + tokens > self.max_seq_len

    def _grew(self, layer: int, tokens: int) -> None:
        if self._checking:
            self._len_bound[layer] = min(self._len_bound[layer] + tokens, self.max_seq_len)

    @contextlib.contextmanager
    def full_bounds(self):
        """Within: every bound is the static length and appends do no host-side overflow check
        (capturing a CUDA graph, whose caller checks lengths on the host). Restored after."""
        saved = list(self._len_bound)
        self._len_bound, self._checking = [self.max_seq_len] * self.num_layers, False
        try:
            yield
        finally:
            self._len_bound, self._checking = saved, True


def resolve_impl(impl: str, device: torch.device) -> str:
    """``auto`` means Triton on CUDA and torch elsewhere; ``triton`` on CPU needs TRITON_INTERPRET=1."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; valid: {', '.join(IMPLS)}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return impl


class QuantizedKVCache(HostLengthBounds):
    """Preallocated KV cache for ``num_layers`` layers, compressed as ``spec`` says."""

    def __init__(self, num_layers: int, batch: int, max_seq_len: int, num_kv_heads: int,
                 head_dim: int, spec: KVCacheSpec | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                 impl: str = "auto") -> None:
        spec = spec or KVCacheSpec()
        spec.check_head_dim(head_dim)
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"cache dtype must be bfloat16 or float16, got {dtype}")
        for name, val in (("num_layers", num_layers), ("batch", batch),
                          ("max_seq_len", max_seq_len), ("num_kv_heads", num_kv_heads)):
            if val < 1:
                raise ValueError(f"{name} must be >= 1, got {val}")
        self.spec, self.num_layers, self.batch = spec, num_layers, batch
        self.max_seq_len, self.num_kv_heads, self.head_dim = max_seq_len, num_kv_heads, head_dim
        self.device, self.dtype = torch.device(device), dtype
        self.impl = resolve_impl(impl, self.device)
        lead = (num_layers, batch, num_kv_heads)
        S, D, G = max_seq_len, head_dim, spec.group_size
        dev = self.device

        def codes(fmt: str, blocked: bool) -> torch.Tensor:
            if fmt == "bf16":
                return torch.zeros(*lead, S, D, dtype=dtype, device=dev)
            cdt = torch.int8 if fmt == "int8" else torch.uint8
            nb = D * KV_BITS[fmt] // 8
            if blocked:   # values: token-blocked [S_pad / TB, NB, TB] (see formats.kv)
                tb = VALUE_TOKEN_BLOCK
                return torch.zeros(*lead, padded_tokens(S) // tb, nb, tb, dtype=cdt, device=dev)
            return torch.zeros(*lead, S, nb, dtype=cdt, device=dev)

        self._t: dict[str, torch.Tensor | None] = dict.fromkeys(
            ("k", "k_scale", "k_min", "v", "v_scale", "v_min", "k_res", "v_res"))
        self._t["k"] = codes(spec.key_format, False)
        self._t["v"] = codes(spec.value_format, True)
        if spec.key_format in PER_TOKEN_FORMATS:
            self._t["k_scale"] = torch.ones(*lead, S, dtype=torch.float32, device=dev)
        if spec.grouped_keys:
            self._t["k_scale"] = torch.zeros(*lead, S // G, D, dtype=torch.float16, device=dev)
            self._t["k_min"] = torch.zeros(*lead, S // G, D, dtype=torch.float16, device=dev)
            R = spec.residual_length
            self._t["k_res"] = torch.zeros(*lead, R, D, dtype=dtype, device=dev)
            self._t["v_res"] = torch.zeros(*lead, R, D, dtype=dtype, device=dev)
        if spec.value_format in PER_TOKEN_FORMATS:
            self._t["v_scale"] = torch.ones(*lead, S, dtype=torch.float32, device=dev)
        if spec.value_format in GROUPED_FORMATS:
            VG = spec.vgroup(D)
            self._t["v_scale"] = torch.zeros(*lead, S, D // VG, dtype=torch.float16, device=dev)
            self._t["v_min"] = torch.zeros(*lead, S, D // VG, dtype=torch.float16, device=dev)
        self.lengths = torch.zeros(num_layers, batch, dtype=torch.int32, device=dev)
        self._init_bounds()

    # ------------------------------------------------------------------ bookkeeping
    def layer_tensors(self, layer: int) -> dict[str, torch.Tensor | None]:
        """The stored tensors (codes, scales, ...) of ``layer``, as views."""
        self._check_layer(layer)
        return {k: (None if t is None else t[layer]) for k, t in self._t.items()}

    def quantized_lengths(self, layer: int) -> torch.Tensor:
        """Per row, how many tokens are in the compressed store (the rest are in the residual)."""
        L = self.lengths[layer]
        if not self.spec.grouped_keys:
            return L
        R = self.spec.residual_length
        return torch.div(L, R, rounding_mode="floor") * R

    def reset(self) -> None:
        """Empty every row of every layer (the storage stays allocated)."""
        self.lengths.zero_()
        self._init_bounds()

    def nbytes(self) -> int:
        """Bytes the cache's storage occupies on its device."""
        return sum(t.numel() * t.element_size() for t in self._t.values() if t is not None)

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range for a cache of {self.num_layers} layers")

    # ------------------------------------------------------------------ append
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               num_new: torch.Tensor | list[int] | None = None) -> None:
        """Append ``T`` new tokens per row (``k``, ``v``: ``[B, Hkv, T, D]``) after each row's end.

        ``num_new`` (``[B]``) says how many of the ``T`` are real for each row (right padding);
        default all ``T``. With ``spec.pre_rope`` pass keys before RoPE.
        """
        self._check_layer(layer)
        expect = (self.batch, self.num_kv_heads)
        if k.dim() != 4 or tuple(k.shape[:2]) != expect or k.shape[-1] != self.head_dim \
                or k.shape != v.shape:
            raise ValueError(f"append expects k and v of shape [batch={self.batch}, "
                             f"num_kv_heads={self.num_kv_heads}, T, head_dim={self.head_dim}], "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        T = k.shape[2]
        if num_new is None:
            num_new = torch.full((self.batch,), T, dtype=torch.int32, device=self.device)
        else:
            num_new = torch.as_tensor(num_new, dtype=torch.int32).to(self.device)
        if self._past_bound(layer, T):
            longest = int((self.lengths[layer] + num_new).max())   # sync only near the end
            if longest > self.max_seq_len:
                raise ValueError(f"append past max_seq_len: layer {layer} would hold {longest} "
                                 f"tokens in a row, max_seq_len={self.max_seq_len}")
        if self.spec.rotate_keys:
            k = rotate(k.float())
        if self.impl == "triton":
            from qcompile.codegen.attention.append import launch_append
            launch_append(self, layer, k.contiguous(), v.contiguous(), num_new, T)
        else:
            self._append_torch(layer, k, v, num_new)
        self.lengths[layer] += num_new
        self._grew(layer, T)

    def _store_rows(self, fmt: str, prefix: str, layer: int, b: int, p0: int, x: torch.Tensor) -> None:
        """Write per-token rows ``x`` ([H, n, D]) at positions ``p0..p0+n`` (torch path)."""
        n = x.shape[1]
        if fmt == "bf16":
            self._t[prefix][layer, b, :, p0:p0 + n] = x.to(self.dtype)
            return
        if fmt in PER_TOKEN_FORMATS:
            c, s = quantize_per_token(x, fmt)
            self._t[f"{prefix}_scale"][layer, b, :, p0:p0 + n] = s
        else:
            xg = x.float().reshape(*x.shape[:-1], -1, self.spec.vgroup(self.head_dim))
            c, s, m = quantize_asym(xg, KV_BITS[fmt], dim=-1)
            c = pack_bits(c.reshape(x.shape), KV_BITS[fmt])
            self._t[f"{prefix}_scale"][layer, b, :, p0:p0 + n] = s
            self._t[f"{prefix}_min"][layer, b, :, p0:p0 + n] = m
        if prefix == "k":
            self._t["k"][layer, b, :, p0:p0 + n] = c
        else:   # token-blocked value codes: token p at [p // TB, :, p % TB]
            pos = torch.arange(p0, p0 + n, device=c.device)
            tb = VALUE_TOKEN_BLOCK
            self._t["v"][layer, b][:, pos // tb, :, pos % tb] = c.transpose(0, 1).to(self._t["v"].dtype)

    def _append_torch(self, layer: int, k: torch.Tensor, v: torch.Tensor, num_new: torch.Tensor) -> None:
        spec = self.spec
        for b in range(self.batch):
            l0, nb = int(self.lengths[layer, b]), int(num_new[b])
            if nb == 0:
                continue
            kb, vb = k[b, :, :nb].float(), v[b, :, :nb].float()
            self._store_rows(spec.value_format, "v", layer, b, l0, vb)
            if not spec.grouped_keys:
                self._store_rows(spec.key_format, "k", layer, b, l0, kb)
                continue
            R, G, bits = spec.residual_length, spec.group_size, KV_BITS[spec.key_format]
            q0, q1 = l0 // R * R, (l0 + nb) // R * R
            res_k, res_v = self._t["k_res"][layer, b], self._t["v_res"][layer, b]
            old = res_k[:, : l0 - q0].float()
            full_k = torch.cat([old, kb], 1)                       # positions q0 .. l0+nb
            full_v = torch.cat([res_v[:, : l0 - q0].float(), vb], 1)
            if q1 > q0:
                xg = full_k[:, : q1 - q0].reshape(self.num_kv_heads, -1, G, self.head_dim)
                c, s, m = quantize_asym(xg, bits, dim=2)
                self._t["k"][layer, b, :, q0:q1] = pack_bits(c, bits).reshape(
                    self.num_kv_heads, q1 - q0, -1)
                per = 8 // bits      # scales stored slice-major (see formats.kv)
                self._t["k_scale"][layer, b, :, q0 // G: q1 // G] = slice_major(s, per)
                self._t["k_min"][layer, b, :, q0 // G: q1 // G] = slice_major(m, per)
            tail = l0 + nb - q1
            if tail:
                res_k[:, :tail] = full_k[:, q1 - q0:].to(self.dtype)
                res_v[:, :tail] = full_v[:, q1 - q0:].to(self.dtype)

    # ------------------------------------------------------------------ dequantize
    def dequantize(self, layer: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``layer`` as stored (rotated / pre-RoPE as the spec says), ``[B, H, S, D]``.

        Positions at or past each row's length are zero; residual tokens come from the ring.
        """
        spec, t = self.spec, self.layer_tensors(layer)
        S, D, G = self.max_seq_len, self.head_dim, spec.group_size

        def deq(fmt: str, prefix: str) -> torch.Tensor:
            c = t[prefix]
            if fmt == "bf16":
                return c.to(dtype)
            if prefix == "v":
                c = unblock_tokens(c, S)
            if fmt in PER_TOKEN_FORMATS:
                return dequantize_per_token(c, t[f"{prefix}_scale"], fmt, dtype)
            codes = unpack_bits(c, KV_BITS[fmt]).to(dtype)
            s, m = t[f"{prefix}_scale"].to(dtype), t[f"{prefix}_min"].to(dtype)
            if prefix == "v":
                VG = spec.vgroup(D)
                return (codes.reshape(*codes.shape[:-1], D // VG, VG) * s[..., None] + m[..., None]
                        ).reshape(codes.shape)
            ng = S // G
            per = 8 // KV_BITS[fmt]
            s, m = channel_major(s, per), channel_major(m, per)
            cg = codes[..., : ng * G, :].reshape(*codes.shape[:-2], ng, G, D)
            out = torch.zeros_like(codes)
            out[..., : ng * G, :] = (cg * s[..., None, :] + m[..., None, :]).reshape(
                *codes.shape[:-2], ng * G, D)
            return out

        k, v = deq(spec.key_format, "k"), deq(spec.value_format, "v")
        L = self.lengths[layer].to(k.device)
        pos = torch.arange(S, device=k.device)
        if spec.grouped_keys:
            R = spec.residual_length
            q = torch.div(L, R, rounding_mode="floor") * R
            in_res = (pos[None, :] >= q[:, None]) & (pos[None, :] < L[:, None])      # [B, S]
            slot = pos % R
            rk = t["k_res"].to(dtype)[:, :, slot]                                      # [B, H, S, D]
            rv = t["v_res"].to(dtype)[:, :, slot]
            sel = in_res[:, None, :, None]
            k, v = torch.where(sel, rk, k), torch.where(sel, rv, v)
        valid = (pos[None, :] < L[:, None])[:, None, :, None]
        return k * valid, v * valid
