"""Token generation over a compiled causal LM's static KV cache, shaped like gpt-fast's generate.py:
``prefill`` (the prompt in one forward, or in chunks), ``decode_one_token``, ``decode_n_tokens``,
``generate``. The model is a ``runtime.decoder.CachedDecoder``; ``CompiledModel.generate`` wraps this.

Batched prompts of different lengths: ``attention_mask`` marks the real tokens (left padding as
Hugging Face writes it, or right padding). The rows are packed to the left, each row's cache holds
only its own tokens, and every row continues at its own position: the cache's per-row lengths,
which the decode kernel reads, replace a padding mask.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qcompile.runtime.decoder import CachedDecoder


@dataclass
class GenerationStats:
    """Times of one ``generate`` call (device-synchronized), for the CLI and benchmarks."""

    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: tokens generated after the first, per second, summed over rows."""
        return self.new_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample(logits: torch.Tensor, *, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row of ``logits`` ``[B, V]``: the argmax, or with ``do_sample`` a draw
    from ``softmax(logits / temperature)`` restricted to the ``top_k`` largest and to the smallest
    set whose probability reaches ``top_p`` (Hugging Face's order: temperature, top-k, top-p)."""
    if not do_sample:
        return logits.argmax(-1)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        ordered, order = torch.sort(logits, descending=True, dim=-1)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p   # tokens after the set that already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def pack_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, lengths)``: each row's real tokens moved to the front (``[B, T]``, right padded)
    and their counts ``[B]``. Real tokens must be contiguous in every row (left or right padding)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return input_ids, torch.full((input_ids.shape[0],), input_ids.shape[1], dtype=torch.int32,
                                     device=input_ids.device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids "
                         f"{tuple(input_ids.shape)}")
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    first = mask.int().argmax(1)
    span = torch.arange(input_ids.shape[1], device=mask.device)
    contiguous = (mask == ((span >= first[:, None]) & (span < (first + lengths)[:, None]))).all(1)
    bad = [i for i, ok in enumerate(contiguous.tolist()) if not ok] + \
          [i for i, n in enumerate(lengths.tolist()) if n == 0]
    if bad:
        raise ValueError(f"attention_mask row {bad[0]}: the real tokens must be one contiguous run (left or right "
                         "padding) and a row needs at least one")
    index = (first[:, None] + span).clamp(max=input_ids.shape[1] - 1)
    tokens = torch.gather(input_ids, 1, index)
    return tokens, lengths.to(torch.int32)


def prefill(decoder: CachedDecoder, tokens: torch.Tensor, lengths: torch.Tensor,
            chunk_size: int | None = None) -> torch.Tensor:
    """Run the prompts (``tokens`` right padded, ``lengths`` real per row) into the empty cache and
    return each row's next-token logits ``[B, V]``; ``chunk_size``: at most that many tokens per
    forward (chunked prefill onto the growing cache)."""
    B, T = tokens.shape
    step = T if chunk_size is None else chunk_size
    if step < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lengths = lengths.to(tokens.device)
    last = None
    for c0 in range(0, T, step):
        chunk = tokens[:, c0:c0 + step]
        n = chunk.shape[1]
        positions = (c0 + torch.arange(n, device=tokens.device)).expand(B, n)
        num_new = (lengths - c0).clamp(0, n).to(torch.int32)
        full = bool((num_new == n).all())
        mine = (lengths - 1 - c0).clamp(0, n - 1).long()
        here = decoder(chunk, positions, None if full else num_new, logit_rows=mine)
        inside = ((lengths - 1 >= c0) & (lengths - 1 < c0 + n))[:, None]
        last = here if last is None else torch.where(inside, here, last)
    return last


def decode_one_token(decoder: CachedDecoder, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, V]`` after appending one token per row (``token``, ``position``: ``[B]``): a
    captured CUDA graph's replay on CUDA (``CachedDecoder.decode_step``)."""
    return decoder.decode_step(token, position)


def decode_n_tokens(decoder: CachedDecoder, token: torch.Tensor, position: torch.Tensor, n: int, *,
                    eos: torch.Tensor | None, pad_token_id: int, finished: torch.Tensor, streamer: Any = None,
                    **sampling: Any) -> list[torch.Tensor]:
    """Up to ``n`` further tokens per row after ``token`` (at ``position``): each step samples from
    the last logits; rows that produced an ``eos`` token get ``pad_token_id`` afterwards; stops
    early when every row has finished. Returns the tokens, ``[B]`` each."""
    out = []
    for _ in range(n):
        logits = decode_one_token(decoder, token, position)
        position = position + 1
        token = sample(logits, **sampling)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        out.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
        if eos is not None:
            finished = finished | torch.isin(token, eos)
            if bool(finished.all()):
                break
    return out


def generate(decoder: CachedDecoder, input_ids: torch.Tensor, max_new_tokens: int = 32, *,
             attention_mask: torch.Tensor | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, streamer: Any = None, max_length: int | None = None,
             prefill_chunk_size: int | None = None, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, GenerationStats]:
    """``input_ids`` followed by up to ``max_new_tokens`` generated tokens per row (Hugging Face's
    output: ``[B, T + new]``, rows that finished early padded with ``pad_token_id``, default the
    first ``eos_token_id``), and the call's timings. ``max_length``: tokens per row the static cache
    holds (default: the longest prompt plus ``max_new_tokens``); asking for more is an error."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    input_ids = input_ids.to(decoder.device)
    mask = attention_mask.to(decoder.device) if attention_mask is not None else None
    tokens, lengths = pack_prompts(input_ids, mask)
    longest = int(lengths.max())
    needed = longest + max_new_tokens - 1        # the last sampled token is never fed back
    if max_length is None:
        max_length = needed
    elif needed > max_length:
        raise ValueError(f"generate: the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} needs a "
                         f"cache of {needed} tokens per row, more than max_length={max_length}")
    tokens = tokens[:, :longest]
    decoder.allocate(tokens.shape[0], max_length)
    eos = None
    if eos_token_id is not None:
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        eos = torch.tensor(ids, device=decoder.device)
        pad_token_id = ids[0] if pad_token_id is None else pad_token_id
    pad_token_id = 0 if pad_token_id is None else pad_token_id
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    _sync(decoder.device)
    t0 = time.perf_counter()
    first = sample(prefill(decoder, tokens, lengths, prefill_chunk_size), **sampling)
    finished = torch.zeros_like(first, dtype=torch.bool)
    if streamer is not None:
        streamer.put(first.cpu())
    if eos is not None:
        finished = torch.isin(first, eos)
    _sync(decoder.device)
    t1 = time.perf_counter()
    rest = []
    if max_new_tokens > 1 and not bool(finished.all()):
        rest = decode_n_tokens(decoder, first, lengths.long(), max_new_tokens - 1, eos=eos,
                               pad_token_id=pad_token_id, finished=finished, streamer=streamer, **sampling)
    _sync(decoder.device)
    t2 = time.perf_counter()
    if streamer is not None:
        streamer.end()
    new = torch.stack([first, *rest], 1)
    stats = GenerationStats(prompt_tokens=int(lengths.sum()), new_tokens=len(rest) * new.shape[0],
                            prefill_s=t1 - t0, decode_s=t2 - t1)
    return torch.cat([input_ids, new.to(input_ids.dtype)], 1), stats
