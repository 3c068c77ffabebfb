"""Scratch memory of ``decode_attention``, owned by the runtime rather than by the cache.

A split-KV decode writes every split's partial output (``opart [rows, splits, D]`` float32) and
log-sum-exp (``lpart [rows, splits]``), then merges them. With few splits the last program of each
(batch row, KV head) to finish merges: it knows it is last from an atomic ticket, one int32 per
head, which must be zero before the launch; the kernel leaves it zero again. So the tickets are
allocated (and zeroed) once, outside any CUDA graph capture, and reused by every call and layer.

    ws = DecodeWorkspace("cuda")                 # one per stream that decodes
    out = decode_attention(q, cache, layer, workspace=ws)

A workspace grows on demand and keeps what it allocated, so after one call of the largest shape
(e.g. eagerly, before capturing a CUDA graph) later calls allocate nothing. Without ``workspace=``
``decode_attention`` uses :func:`default_workspace`: per device and stream, tickets kept, the
partial buffers allocated per call (their size follows the call, and the caching allocator reuses
them). A workspace must not serve two streams at once.
"""

from __future__ import annotations

import torch


class DecodeWorkspace:
    """Tickets and partial-output buffers for ``decode_attention`` on one device.

    ``keep_partials``: keep the partial buffers between calls (the default); ``False`` allocates
    them per call, as :func:`default_workspace` does.
    """

    def __init__(self, device: torch.device | str = "cpu", *, keep_partials: bool = True) -> None:
        self.keep_partials = keep_partials
        self.tickets = torch.zeros(0, dtype=torch.int32, device=device)
        self.device = self.tickets.device          # "cuda" resolved to "cuda:<current>"
        self._opart = torch.empty(0, dtype=torch.float32, device=self.device)
        self._lpart = torch.empty(0, dtype=torch.float32, device=self.device)

    def reserve(self, heads: int, rows: int = 0, splits: int = 0, head_dim: int = 0) -> DecodeWorkspace:
        """Grow to ``heads`` tickets and ``rows x splits`` partials of ``head_dim`` (call this, or
        decode once, before capturing a CUDA graph). Returns ``self``."""
        if self.tickets.numel() < heads:
            self.tickets = torch.zeros(heads, dtype=torch.int32, device=self.device)
        if self.keep_partials and self._lpart.numel() < rows * splits:
            self._lpart = torch.empty(rows * splits, dtype=torch.float32, device=self.device)
        if self.keep_partials and self._opart.numel() < rows * splits * head_dim:
            self._opart = torch.empty(rows * splits * head_dim, dtype=torch.float32, device=self.device)
        return self

    def buffers(self, heads: int, rows: int, splits: int, head_dim: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(tickets [heads], opart [rows, splits, head_dim], lpart [rows, splits])`` for one
        call; the tickets are zero (the kernel leaves them so), the partials uninitialized."""
        self.reserve(heads, rows, splits, head_dim)
        if not self.keep_partials:
            return (self.tickets[:heads],
                    torch.empty(rows, splits, head_dim, dtype=torch.float32, device=self.device),
                    torch.empty(rows, splits, dtype=torch.float32, device=self.device))
        return (self.tickets[:heads], self._opart[: rows * splits * head_dim].view(rows, splits, head_dim),
                self._lpart[: rows * splits].view(rows, splits))


_DEFAULT: dict[tuple[torch.device, int], DecodeWorkspace] = {}


def default_workspace(device: torch.device) -> DecodeWorkspace:
    """The workspace of ``decode_attention`` calls without ``workspace=``: one per (device,
    stream), created on first use; partial buffers per call."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    ws = _DEFAULT.get(key)
    if ws is None:
        ws = _DEFAULT[key] = DecodeWorkspace(device, keep_partials=False)
    return ws
