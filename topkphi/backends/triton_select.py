"""Launchers of the page-selection kernels (``topkphi/kernels/triton_select.py``).

``page_bounds`` is the Quest bound in one read of the metadata; ``page_read_set`` is the whole
page selection of a decode step. By default two launches: the bound kernel (with the maxima of runs
of ``SUB_BLOCK`` pages) and ``select_pages_kernel``, which writes the read index and the step's
counts; the older path (``selector="topk"``: ``torch.topk`` of ``n_take + 1`` candidates, then a
read-index kernel) stays for comparison. No host sync: either captures in a CUDA graph.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from topkphi.backends.torch_ops import ReadSet
from topkphi.backends.triton_launch import chain_launches, interpreting
from topkphi.kernels.triton_select import page_bounds_kernel, read_index_kernel, select_pages_kernel

MAX_TILE = 1 << 15  # chosen pages x page size handled by one read-index program
SUB_BLOCK = 16  # pages per sub-block maximum that the threshold selection bisects on


def bound_tiling(use_dot: bool) -> tuple[int, int, int, int]:
    """(block_p, blocks_per_program, num_stages, num_warps; 0: by tile size) of the bound kernel. Tensor-core form,
    measured on an H200 (bf16, d 128, G 4, 8 rows, benchmarks/select_variants.py): two pipelined blocks
    of 64 pages on 4 warps, 11.6 us at 8k pages per row (13.3 for one block of 128, 18.1 for 64 on 8
    warps) and 37.3 us at 32k (41.2 to 61.0 for the one-block tilings)."""
    if not use_dot:
        return 64, 1, 1, 0
    return 64, 2, 2, 4


def select_tile(n_take: int) -> int:
    """Sub-block maxima, and candidate pages, that the threshold kernel holds in registers: room for
    at least n_take candidate sub-blocks (2048 measured 10% faster than 4096 on an H200 at n_take 128)."""
    return SUB_BLOCK * max(128, _p2(n_take))


@dataclass
class PageReadSet(ReadSet):
    """A ``ReadSet`` plus what the fused decode and the step's stats take without extra kernels:
    ``n_read32``/``n_anchor32 [B,Hkv]`` int32 and ``token_equivalents [B,Hkv]`` fp32."""

    n_read32: torch.Tensor | None = None
    n_anchor32: torch.Tensor | None = None
    token_equivalents: torch.Tensor | None = None
    chained: bool = False  # written by a kernel that lets the decode launch as its dependent


def _p2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


def page_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, tau: float, block_p: int | None = None,
                row: int | None = None, sub_block: int = 0, num_warps: int | None = None,
                blocks_per_program: int | None = None, num_stages: int | None = None,
                use_dot: bool | None = None, chained: bool = False):
    """``u [B, Hkv, n_pages]`` fp32 (SPEC 3): ``q [B,Hq,d]``, ``kmin``/``kmax [B,Hkv,n_pages,d]``,
    any float dtype and strides; query head h belongs to KV head ``h // (Hq // Hkv)``.
    ``row >= n_pages`` pads each row to that length with -inf (returns ``[B, Hkv, row]``).
    ``sub_block > 0`` (a power of two <= 16) returns ``(u, bm)`` with ``bm [B, Hkv, >= cdiv(n_pages,
    sub_block)]`` the maxima of consecutive runs of ``sub_block`` pages (-inf past the row).
    ``blocks_per_program`` blocks of ``block_p`` pages per program, software-pipelined ``num_stages`` deep;
    what is left None comes from ``bound_tiling``. ``chained``: let a programmatic dependent (the
    selection kernel) launch while this one runs.
    ``use_dot``: the bound as two tensor-core products (``q+ kmax + q- kmin``, exact products, fp32 sums);
    None picks it when q and the metadata share a 16-bit dtype (fp32 keeps the literal elementwise form)."""
    B, Hq, D = q.shape
    Hkv, n_pages = kmin.shape[1], kmin.shape[2]
    if Hq % Hkv or kmin.shape != kmax.shape or kmin.shape[0] != B or kmin.shape[3] != D:
        raise ValueError(f"shapes q {tuple(q.shape)}, kmin {tuple(kmin.shape)}, kmax {tuple(kmax.shape)}")
    row = n_pages if row is None else max(row, n_pages)
    native_dot = q.dtype == kmin.dtype == kmax.dtype and q.dtype in (torch.bfloat16, torch.float16)
    use_dot = native_dot if use_dot is None else use_dot
    tiling = bound_tiling(use_dot)
    block_p = block_p or tiling[0]
    blocks_per_program = blocks_per_program or tiling[1]
    num_stages = num_stages or tiling[2]
    num_warps = num_warps or tiling[3] or (8 if block_p * _p2(D, 16) >= 8192 else 4)
    # rows padded to multiples of 16 (with -inf): a row stride that moves with the context would
    # either recompile the kernels or cost them their vectorized accesses
    u = torch.empty(B, Hkv, _round16(row), dtype=torch.float32, device=q.device)
    block_p = min(block_p, _p2(row, 16))
    n_blocks = triton.cdiv(row, block_p)
    bm = torch.empty(B, Hkv, _round16(n_blocks * block_p // max(1, sub_block)), dtype=torch.float32, device=q.device)
    if row > 0 and B * Hkv > 0:
        page_bounds_kernel[(B * Hkv, triton.cdiv(n_blocks, blocks_per_program))](
            q, kmin, kmax, u, bm, bm.shape[-1], *q.stride(), *kmin.stride(), *kmax.stride(), Hkv, n_pages,
            u.shape[-1], D, float(tau), blocks_per_program, G=Hq // Hkv, BLOCK_P=block_p, BLOCK_D=_p2(D, 16),
            SB=sub_block, NUM_STAGES=num_stages, USE_DOT=use_dot, GP=_p2(Hq // Hkv, 16), GDC=chained,
            DOT_F32=not native_dot or interpreting(q), num_warps=num_warps,
        )
    u = u[..., :row]
    return (u, bm) if sub_block else u


def _round16(n: int) -> int:
    return max(16, -(-n // 16) * 16)


def fits(n_take: int, page_size: int) -> bool:
    """Whether ``page_read_set`` handles this budget in one program per head."""
    return _p2(n_take + 1) * _p2(page_size) <= MAX_TILE


def page_read_set(q, summary, tau: float, n_take: int, page_size: int, regions, te_summary=0.0, te_selection=0.0,
                  topk_chunk: int | None = None, selector: str | None = None, tile: int | None = None,
                  select_warps: int = 8):
    """Page selection of one step (SPEC 3) as a ``PageReadSet``; needs ``n_take < n_pages``.

    ``selector``: ``"threshold"`` (default): the bound kernel also writes sub-block maxima and one
    kernel per head thresholds, bisects and writes the read index (``select_pages_kernel``: two
    launches, no sort of the row); ``"topk"``: ``torch.topk`` over the bounds, then the read-index
    kernel. None reads ``TOPKPHI_PAGE_SELECT``. Both give the SPEC's pages exactly. ``tile``: how many
    sub-block maxima and candidate pages the threshold kernel keeps in registers (a power of two >=
    ``SUB_BLOCK``; None: ``select_tile(n_take)``); rows past it take the kernel's chunked path (tests
    shrink it to reach that path).

    ``regions``: ``topkphi.regions.Regions`` of the cache; ``te_summary``/``te_selection``: the
    token-equivalents of the summary and of the metadata read (SPEC 6), added to ``n_read``.
    ``topk_chunk``: pages per chunk of a two-stage topk (per chunk, then over the chunk winners;
    used when a row holds at least 4 chunks and a chunk is larger than 4 * (n_take + 1));
    None reads ``TOPKPHI_TOPK_CHUNK`` (default 2048; 0: always one ``torch.topk`` over the row).
    On the H100 one ``torch.topk`` over 8 rows costs ~50 us at 8k-32k pages per row; the two-stage
    form took 6-23 us off the 512k step (docs/BENCHMARKS.md).
    """
    kmin, kmax = summary.kmin, summary.kmax
    B, Hkv, n_pages = kmin.shape[:3]
    if not 0 < n_take < n_pages:
        raise ValueError(f"page_read_set needs 0 < n_take < n_pages, got {n_take} of {n_pages}")
    if selector is None:
        selector = os.environ.get("TOPKPHI_PAGE_SELECT", "threshold")
    if selector not in ("threshold", "topk"):
        raise ValueError(f"selector must be 'threshold' or 'topk', got {selector!r}")
    dev = q.device
    n_anchor = regions.n_anchor
    R = n_anchor + n_take * page_size
    block_k = _p2(n_take + 1)
    rows = B * Hkv
    idx = torch.empty(B, Hkv, R, dtype=torch.int64, device=dev)
    n_sel = torch.empty(B, Hkv, dtype=torch.int64, device=dev)
    n_read = torch.empty_like(n_sel)
    n_read32 = torch.empty(B, Hkv, dtype=torch.int32, device=dev)
    n_anchor32 = torch.empty_like(n_read32)
    te = torch.empty(B, Hkv, dtype=torch.float32, device=dev)
    outputs = (idx, n_sel, n_read, n_read32, n_anchor32, te)
    common = (n_take, R, summary.first_page, page_size, regions.sink_end, regions.mid_start, regions.mid_end,
              n_anchor, float(te_summary), float(te_selection))
    blocks = dict(BLOCK_K=block_k, BLOCK_T=_p2(page_size), BLOCK_A=_p2(n_anchor), BLOCK_PAD=_p2(2 * page_size))
    if selector == "threshold":
        tile = tile or select_tile(n_take)
        chained = chain_launches(q)
        u, bm = page_bounds(q, kmin, kmax, tau, sub_block=SUB_BLOCK, chained=chained)
        n_sb = triton.cdiv(n_pages, SUB_BLOCK)
        work = torch.empty(rows, 2 * n_pages + n_sb, dtype=torch.int64, device=dev)
        pages = torch.empty(rows, block_k, dtype=torch.int32, device=dev)
        select_pages_kernel[(rows,)](
            u, bm, work, pages, *outputs, n_pages, u.stride(-2), n_sb, bm.stride(-2), *common,
            SB=SUB_BLOCK, CH=tile, CHS=tile // SUB_BLOCK, **blocks, num_warps=select_warps, GDC=chained,
            **(dict(launch_pdl=True) if chained else {}),
        )
        return PageReadSet(idx, n_read, n_sel, n_anchor, False, n_read32, n_anchor32, te, chained)
    if topk_chunk is None:
        topk_chunk = int(os.environ.get("TOPKPHI_TOPK_CHUNK", "2048"))
    n_cand = n_take + 1
    two_stage = topk_chunk > 4 * n_cand and n_pages >= 4 * topk_chunk
    if two_stage:
        n_chunks = triton.cdiv(n_pages, topk_chunk)
        u = page_bounds(q, kmin, kmax, tau, row=n_chunks * topk_chunk)
        wins, first = torch.topk(u.reshape(B, Hkv, n_chunks, topk_chunk), n_cand, dim=-1, sorted=False)
        first = first.reshape(B, Hkv, n_chunks * n_cand)
        vals, cand = torch.topk(wins.reshape(B, Hkv, -1), n_cand, dim=-1, sorted=False)
    else:
        u = page_bounds(q, kmin, kmax, tau)
        vals, cand = torch.topk(u, n_cand, dim=-1, sorted=False)
        first = cand
    vals, cand, first = vals.contiguous(), cand.contiguous(), first.contiguous()
    scratch = torch.empty(rows, block_k, dtype=torch.int32, device=dev)
    read_index_kernel[(rows,)](
        vals, cand, first, u, scratch, *outputs,
        n_pages, u.stride(-2), n_cand, first.shape[-1], max(1, topk_chunk), *common,
        **blocks, BLOCK_S=1024, TWO_STAGE=two_stage, num_warps=4,
    )
    return PageReadSet(idx, n_read, n_sel, n_anchor, False, n_read32, n_anchor32, te)
