"""vLLM's paged KV cache read as topkphi's ``[1, Hkv, N, d]`` arrays, and the plan of one step's
decode rows. Imports torch only (never vllm), so it is tested without vLLM.

A layer's cache is ``[num_blocks, Hkv, block_size, 2 * head_size]`` in vLLM's logical order
(keys, then values, per block and head); a sequence is the blocks its block-table row names.
How a block's interior is laid out is the attention kernel's business:

- ``PlainLayout``: keys in ``[..., :d]`` and values in ``[..., d:]`` (the Triton/flash layout);
- ``ProbedLayout``: any fixed permutation inside a (block, head) (vLLM's CPU kernels store keys
  transposed, or VNNI-packed for AMX), found once by letting the kernel's own cache writer place
  numbered tokens and reading back where each element went.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


class PlainLayout:
    """``[nb, Hkv, bs, 2d]`` holding rows ``[k | v]`` (any strides)."""

    def gather(self, kv_cache: torch.Tensor, blocks: torch.Tensor, n_tokens: int):
        """``(k, v)``, each ``[1, Hkv, n_tokens, d]``, of the sequence stored in ``blocks``."""
        _, n_kv, bs, two_d = kv_cache.shape
        rows = kv_cache.index_select(0, blocks).transpose(0, 1).reshape(1, n_kv, -1, two_d)[:, :, :n_tokens]
        d = two_d // 2
        return rows[..., :d], rows[..., d:]


class ProbedLayout:
    """A (block, head) region of ``2 * bs * d`` elements whose key and value entries sit at
    ``k_offset[t, j]`` and ``v_offset[t, j]`` (token ``t`` of the block, element ``j``)."""

    def __init__(self, k_offset: torch.Tensor, v_offset: torch.Tensor) -> None:
        self.k_offset, self.v_offset = k_offset, v_offset

    @classmethod
    def probe(cls, write: Callable, block_size: int, head_size: int, dtype: torch.dtype) -> ProbedLayout:
        """Where ``write(key, value, key_cache, value_cache, slots)`` (the kernel's own writer, with
        vLLM's ``[nb, H, bs, 2d]`` cache viewed and chunked as its attention does) puts each element.

        Element ``x = t * d + j`` is written as its base-16 digits, one pass per digit, so every
        value written is an integer in 1..16: exact in any float format the cache may use.
        """
        bs, d = block_size, head_size
        index = torch.arange(bs * d).reshape(bs, 1, d)
        offsets = []
        for which in (0, 1):  # keys, then values
            element = torch.zeros(2 * bs * d, dtype=torch.long)
            written = torch.zeros(2 * bs * d, dtype=torch.bool)
            for p in range(max(1, math.ceil(math.log2(bs * d) / 4))):
                digit = (((index >> (4 * p)) & 15) + 1).to(dtype)
                cache = torch.zeros(1, 1, bs, 2 * d, dtype=dtype)
                key_cache, value_cache = cache.view(1, 1, 2 * bs, d).chunk(2, dim=2)
                kv = (digit, torch.zeros_like(digit)) if which == 0 else (torch.zeros_like(digit), digit)
                write(kv[0], kv[1], key_cache, value_cache, torch.arange(bs))
                raw = cache.reshape(-1).to(torch.float32).round().long()
                written |= raw > 0
                element += (raw - 1).clamp(min=0) << (4 * p)
            offsets.append(_invert(element, written, bs, d, ("key", "value")[which]))
        return cls(*offsets)

    def gather(self, kv_cache: torch.Tensor, blocks: torch.Tensor, n_tokens: int):
        """``(k, v)``, each ``[1, Hkv, n_tokens, d]``, of the sequence stored in ``blocks``."""
        n_blocks, n_kv, bs, two_d = kv_cache.shape
        raw = kv_cache.view(n_blocks, n_kv, bs * two_d).index_select(0, blocks)  # [nblk, Hkv, 2*bs*d]
        out = []
        for offset in (self.k_offset, self.v_offset):
            x = raw[:, :, offset.to(raw.device)]  # [nblk, Hkv, bs, d]
            out.append(x.transpose(0, 1).reshape(1, n_kv, -1, two_d // 2)[:, :, :n_tokens])
        return out[0], out[1]


def _invert(element: torch.Tensor, written: torch.Tensor, bs: int, d: int, what: str) -> torch.Tensor:
    """``element[p]``: which element the writer put at position ``p`` -> ``offset [bs, d]`` of each element."""
    positions = torch.nonzero(written).flatten()
    offset = torch.full((bs * d,), -1, dtype=torch.long)
    offset[element[positions]] = positions
    if positions.numel() != bs * d or bool((offset < 0).any()):
        raise RuntimeError(f"vLLM's KV cache writer does not store each {what} element once in its block; "
                           "topkphi cannot read this cache layout")
    return offset.reshape(bs, d)


@dataclass
class DecodeRow:
    """One sequence decoding one token this step: its query row, length and blocks."""

    token: int  # row of the step's query and output
    n_tokens: int  # context length, the new token included
    blocks: tuple[int, ...]  # physical blocks holding positions [0, n_tokens)
    block_ids: torch.Tensor  # the same, on the cache's device

    @property
    def key(self) -> int:
        """The block holding the newest token: written this step, so no other live sequence owns it."""
        return self.blocks[-1]


@dataclass
class DecodePlan:
    """The decode rows of one step (they lead the batch) and every block the step writes."""

    step: int
    rows: list[DecodeRow]
    written: set[int]
    block_size: int

    @property
    def n_tokens(self) -> int:
        """Query rows the decodes take (one each); the rest of the batch is prefill."""
        return len(self.rows)


def plan_decodes(step: int, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                 slot_mapping: torch.Tensor, block_size: int) -> DecodePlan:
    """Rows with one query token at the head of the batch are decodes (vLLM puts them first when
    the builder asks); ``query_start_loc`` and ``seq_lens`` are host tensors, ``block_table`` and
    ``slot_mapping`` may live on the device."""
    query_lens = (query_start_loc[1:] - query_start_loc[:-1]).tolist()
    n_decodes = next((i for i, n in enumerate(query_lens) if n != 1), len(query_lens))
    lengths = seq_lens[:n_decodes].tolist()
    table = block_table[:n_decodes]
    host = table.tolist() if n_decodes else []
    rows = []
    for i, n in enumerate(lengths):
        n_blocks = -(-n // block_size)
        rows.append(DecodeRow(i, n, tuple(host[i][:n_blocks]), table[i, :n_blocks].long()))
    written = set((slot_mapping[slot_mapping >= 0] // block_size).tolist())
    return DecodePlan(step, rows, written, block_size)
