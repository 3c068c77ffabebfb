"""A static, preallocated, uncompressed KV cache in the model's dtype (``kv_cache=None``).

The same interface as ``QuantizedKVCache`` where the cached-attention op uses it (``append``,
``lengths``, ``max_length_bound``, ``keys_values``), so that a compiled model without KV
compression runs the same generation graph: with no rounding anywhere, greedy tokens equal
Hugging Face's own ``generate``.
"""

from __future__ import annotations

import torch

from qcompile.runtime.kv_cache import HostLengthBounds


class DenseKVCache(HostLengthBounds):
    """Keys and values ``[num_layers, batch, num_kv_heads, max_seq_len, head_dim]`` in ``dtype``,
    with per-row lengths (right padding: row ``b`` holds positions ``0 .. lengths[layer, b]``)."""

    spec = None

    def __init__(self, num_layers: int, batch: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        for name, val in (("num_layers", num_layers), ("batch", batch), ("max_seq_len", max_seq_len),
                          ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if val < 1:
                raise ValueError(f"{name} must be >= 1, got {val}")
        self.num_layers, self.batch, self.max_seq_len = num_layers, batch, max_seq_len
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.device, self.dtype = torch.device(device), dtype
        shape = (num_layers, batch, num_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.lengths = torch.zeros(num_layers, batch, dtype=torch.int32, device=self.device)
        self._init_bounds()

    def reset(self) -> None:
        """Empty every row of every layer (the storage stays allocated)."""
        self.lengths.zero_()
        self._init_bounds()

    def nbytes(self) -> int:
        """Bytes the cache's storage occupies on its device."""
        return 2 * self.k.numel() * self.k.element_size()

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, num_new: torch.Tensor | None = None) -> None:
        """Write ``T`` new tokens per row (``k``, ``v``: ``[B, Hkv, T, D]``) after each row's end;
        ``num_new`` (``[B]``) of them are real (right padding), default all ``T``. The uniform case
        is one ``scatter_`` with no host sync (what a captured decode step runs)."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range for a cache of {self.num_layers} layers")
        B, H, T, D = k.shape
        if (self.batch, self.num_kv_heads, self.head_dim) != (B, H, D) or k.shape != v.shape:
            raise ValueError(f"append expects k and v of shape [batch={self.batch}, num_kv_heads={self.num_kv_heads}, "
                             f"T, head_dim={self.head_dim}], got {tuple(k.shape)} and {tuple(v.shape)}")
        start = self.lengths[layer].long()
        if self._past_bound(layer, T):
            grown = start + (T if num_new is None else num_new.to(start.device).long())
            if int(grown.max()) > self.max_seq_len:
                raise ValueError(f"append past max_seq_len: layer {layer} would hold {int(grown.max())} tokens in a "
                                 f"row, max_seq_len={self.max_seq_len}")
        pos = start[:, None] + torch.arange(T, device=self.device)                      # [B, T]
        if num_new is None:
            index = pos[:, None, :, None].expand(B, H, T, D)
            self.k[layer].scatter_(2, index, k.to(self.dtype))
            self.v[layer].scatter_(2, index, v.to(self.dtype))
            self.lengths[layer] += T
        else:
            num_new = num_new.to(device=self.device, dtype=torch.int32)
            rows, steps = torch.nonzero(torch.arange(T, device=self.device)[None, :] < num_new[:, None], as_tuple=True)
            at = pos[rows, steps]
            self.k[layer][rows, :, at] = k[rows, :, steps].to(self.dtype)
            self.v[layer][rows, :, at] = v[rows, :, steps].to(self.dtype)
            self.lengths[layer] += num_new
        self._grew(layer, T)

    def keys_values(self, layer: int, upto: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``layer`` over positions ``0 .. upto`` (default: the whole static length),
        ``[B, Hkv, upto, D]``; positions at or past a row's length hold stale values (mask them)."""
        upto = self.max_seq_len if upto is None else upto
        return self.k[layer, :, :, :upto], self.v[layer, :, :, :upto]
