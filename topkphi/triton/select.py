"""Launchers of the page selection of one decode step (kernels ``kernels/bounds.py``, ``kernels/select.py``).

``page_bounds`` is the Quest bound (SPEC 3) in one read of the page metadata; ``page_read_set`` is the
whole selection in two launches and no host sync, so a step captures in a CUDA graph: the bound kernel
(with the maxima of runs of ``SUB_BLOCK`` pages), then ``select_pages_kernel``, one program per KV head,
which thresholds on those maxima, finds the bound at the cut and writes the read index and the counts.
``compact_scores`` / ``compact_read_set`` are the same two kernels over compact page tokens (SPEC 8.2):
scores ``tau q.kappa + beta`` instead of bounds, the fragments of mid read too, and every head's page
logits kept for the decode's pseudo-tokens (``decode.PageEstimate``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from topkphi.regions import Regions
from topkphi.step import ReadSet
from topkphi.summary import CompactPages, PageBounds, complete_pages
from topkphi.triton.decode import PageEstimate
from topkphi.triton.kernels.bounds import page_bounds_kernel
from topkphi.triton.kernels.select import select_pages_kernel
from topkphi.triton.launch import interpreting, p2, round16

MAX_TILE = 1 << 15  # chosen pages x page size that one program expands into the read index
SUB_BLOCK = 16  # pages per sub-block maximum that the threshold selection bisects on


@dataclass
class KernelReadSet(ReadSet):
    """A ``ReadSet`` written by the selection kernels, with its counts written there too, so that no
    kernel runs between the selection and the decode, nor for the read counts of the stats: ``n_read64``,
    ``n_read32 [B,Hkv]`` (int64 for the stats, int32 for the decode); ``chained``: the decode may launch
    as their programmatic dependent."""

    n_read64: torch.Tensor | None = None
    n_read32: torch.Tensor | None = None
    chained: bool = False
    pages: PageEstimate | None = None  # compact selection: the unread pages' pseudo-tokens

    @property
    def n_read(self) -> torch.Tensor:
        return self.n_read64


def bound_tiling(use_dot: bool) -> tuple[int, int, int, int]:
    """(block_p, blocks_per_program, num_stages, num_warps; 0: by tile size) of the bound kernel. Tensor-core form,
    measured on an H200 (bf16, d 128, G 4, 8 rows, benchmarks/select_variants.py): two pipelined blocks
    of 64 pages on 4 warps, 11.6 us at 8k pages per row (13.3 for one block of 128, 18.1 for 64 on 8
    warps) and 37.3 us at 32k (41.2 to 61.0 for the one-block tilings)."""
    if not use_dot:
        return 64, 1, 1, 0
    return 64, 2, 2, 4


def page_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, tau: float, *, block_p: int | None = None,
                sub_block: int = 0, num_warps: int | None = None, blocks_per_program: int | None = None,
                num_stages: int | None = None, use_dot: bool | None = None, chained: bool = False):
    """``u [B, Hkv, n_pages]`` fp32 (SPEC 3) from ``q [B,Hq,d]`` and ``kmin``/``kmax [B,Hkv,n_pages,d]``.

    Any float dtype and strides; query head h belongs to KV head ``h // (Hq // Hkv)``.
    ``sub_block > 0`` (a power of two <= 16) returns ``(u, bm)`` with ``bm [B, Hkv, >= cdiv(n_pages,
    sub_block)]`` the maxima of consecutive runs of ``sub_block`` pages (-inf past the row).
    ``blocks_per_program`` blocks of ``block_p`` pages per program, software-pipelined ``num_stages``
    deep; what is left None comes from ``bound_tiling``. ``use_dot``: the bound as two tensor-core
    products (``q+ kmax + q- kmin``: exact products, fp32 sums); None picks it when q and the metadata
    share a 16-bit dtype (fp32 keeps the literal elementwise form). ``chained``: let a programmatic
    dependent (the selection kernel) launch while this one runs.

    Example::

        q = torch.randn(1, 8, 64); kmin = torch.randn(1, 2, 40, 64); kmax = kmin + 1
        u = page_bounds(q, kmin, kmax, 64 ** -0.5)   # [1, 2, 40]; TRITON_INTERPRET=1 on CPU
    """
    B, Hq, D = q.shape
    Hkv = kmin.shape[1]
    if Hq % Hkv or kmin.shape != kmax.shape or kmin.shape[0] != B or kmin.shape[3] != D:
        raise ValueError(f"shapes q {tuple(q.shape)}, kmin {tuple(kmin.shape)}, kmax {tuple(kmax.shape)}")
    native_dot = q.dtype == kmin.dtype == kmax.dtype and q.dtype in (torch.bfloat16, torch.float16)
    use_dot = native_dot if use_dot is None else use_dot
    tiling = bound_tiling(use_dot)
    block_p = block_p or tiling[0]
    blocks_per_program = blocks_per_program or tiling[1]
    num_stages = num_stages or tiling[2]
    num_warps = num_warps or tiling[3] or (8 if block_p * p2(D, 16) >= 8192 else 4)
    u, bm = _scores(q, kmin, kmax, None, None, tau, sub_block, block_p, blocks_per_program, num_stages, num_warps,
                    use_dot, native_dot, chained)
    return (u, bm) if sub_block else u


def compact_scores(q: torch.Tensor, kappa: torch.Tensor, beta: torch.Tensor, tau: float, *, sub_block: int = 0,
                   chained: bool = False):
    """``(u [B,Hkv,n], logits [B*Hkv, G, >= n], bm)`` fp32 (SPEC 8.2): ``logits`` every head's ``tau
    q_h.kappa_p + beta_p``, ``u`` their maximum over the group, ``bm`` as in ``page_bounds`` (``sub_block``).
    ``kappa [B,Hkv,n,d]``, ``beta [B,Hkv,n]`` any float dtype and strides; 16-bit tokens of q's dtype are
    scored on the tensor cores, fp32 ones as ``_token_precision`` says."""
    B, Hq, D = q.shape
    Hkv, n_pages = kappa.shape[1], kappa.shape[2]
    if Hq % Hkv or kappa.shape[0] != B or kappa.shape[3] != D or beta.shape != kappa.shape[:3]:
        raise ValueError(f"shapes q {tuple(q.shape)}, kappa {tuple(kappa.shape)}, beta {tuple(beta.shape)}")
    logits = torch.empty(B * Hkv, Hq // Hkv, round16(n_pages), dtype=torch.float32, device=q.device)
    native = q.dtype == kappa.dtype and q.dtype in (torch.bfloat16, torch.float16)
    tiling = bound_tiling(True)
    u, bm = _scores(q, kappa, kappa, beta, logits, tau, sub_block, tiling[0], tiling[1], tiling[2], tiling[3], True,
                    native, chained)
    return u, logits, bm


def _token_precision(q: torch.Tensor, kappa: torch.Tensor, interp: bool) -> str:
    """How the score kernel multiplies fp32 compact tokens: exactly under the interpreter; on the GPU, for a
    16-bit q, as two 16-bit products of kappa's high and low halves (~2^-17 relative, tensor cores; tf32x3
    ran the 128k scores at half the bound kernel's speed, H200), else tf32x3."""
    if interp:
        return "ieee"
    if kappa.dtype == torch.float32 and q.dtype in (torch.bfloat16, torch.float16):
        return "split16"
    return "tf32x3"


def _scores(q, kmin, kmax, beta, logits, tau, sub_block, block_p, blocks_per_program, num_stages, num_warps, use_dot,
            native_dot, chained):
    """Launch ``page_bounds_kernel`` (``beta``/``logits`` given: compact scores); ``(u, bm)``."""
    B, Hq, D = q.shape
    Hkv, n_pages = kmin.shape[1], kmin.shape[2]
    # rows padded to multiples of 16 (with -inf): a row stride that moves with the context would
    # either recompile the kernels or cost them their vectorized accesses
    u = torch.empty(B, Hkv, round16(n_pages), dtype=torch.float32, device=q.device)
    block_p = min(block_p, p2(n_pages, 16))
    n_blocks = triton.cdiv(n_pages, block_p)
    bm = torch.empty(B, Hkv, round16(n_blocks * block_p // max(1, sub_block)), dtype=torch.float32, device=q.device)
    compact = beta is not None
    beta_args = (beta, *beta.stride(), logits, *logits.stride()[:2]) if compact else (u, 0, 0, 0, u, 0, 0)
    interp = interpreting(q)
    if n_pages > 0 and B * Hkv > 0:
        page_bounds_kernel[(B * Hkv, triton.cdiv(n_blocks, blocks_per_program))](
            q, kmin, kmax, u, bm, bm.shape[-1], *q.stride(), *kmin.stride(), *kmax.stride(), *beta_args, Hkv, n_pages,
            u.shape[-1], D, float(tau), blocks_per_program, G=Hq // Hkv, BLOCK_P=block_p, BLOCK_D=p2(D, 16),
            SB=sub_block, NUM_STAGES=num_stages, USE_DOT=use_dot, GP=p2(Hq // Hkv, 16), GDC=chained,
            DOT_F32=not native_dot or interp, COMPACT=compact, TOKEN_PREC=_token_precision(q, kmin, interp),
            num_warps=num_warps,
        )
    return u[..., :n_pages], bm


def select_tile(n_take: int) -> int:
    """Sub-block maxima, and candidate pages, that the threshold kernel holds in registers: room for
    at least n_take candidate sub-blocks (2048 measured 10% faster than 4096 on an H200 at n_take 128)."""
    return SUB_BLOCK * max(128, p2(n_take))


def fits(n_take: int, page_size: int) -> bool:
    """Whether ``page_read_set`` expands this budget in one program per head."""
    return p2(n_take + 1) * p2(page_size) <= MAX_TILE


def page_read_set(q: torch.Tensor, pages: PageBounds, first_page: int, tau: float, n_take: int, page_size: int,
                  regions: Regions, *, chained: bool = False, tile: int | None = None,
                  select_warps: int = 8) -> KernelReadSet:
    """Page selection of one step (SPEC 3) in the read-set contract of ``topkphi.step``.

    ``q [B,Hq,d]``; ``pages``: the summary's ``kmin``/``kmax [B,Hkv,n_pages,d]`` of pages
    ``first_page ..`` (any float dtype); ``regions``: the cache's sink, mid and tail. Needs
    ``0 < n_take < n_pages`` (a budget covering mid is exact attention) and ``fits(n_take, page_size)``.
    The ``n_take`` pages of largest bound, ties to the smaller page, exactly as the SPEC says.
    ``tile``: how many sub-block maxima and candidate pages the threshold kernel keeps in registers (a
    power of two >= ``SUB_BLOCK``; None: ``select_tile(n_take)``); rows past it take the kernel's
    chunked path (tests shrink it to reach that path). ``chained``: the two kernels, and the decode
    after them, launch as programmatic dependents (``launch.chains_launches`` says where that works).
    """
    B, Hkv, n_pages = pages.kmin.shape[:3]
    _check_budget(n_take, n_pages, page_size)
    tile = tile or select_tile(n_take)
    u, bm = page_bounds(q, pages.kmin, pages.kmax, tau, sub_block=SUB_BLOCK, chained=chained)
    return _select(q, u, bm, None, n_pages, first_page, n_take, page_size, regions, 0, 0, chained, tile, select_warps)


def compact_read_set(q: torch.Tensor, pages: CompactPages, tau: float, n_take: int, page_size: int, regions: Regions,
                     *, chained: bool = False, tile: int | None = None, select_warps: int = 8) -> KernelReadSet:
    """Compact selection of one step (SPEC 8.2) in the read-set contract, with the unread pages'
    pseudo-tokens (``KernelReadSet.pages``): the ``n_take`` complete pages of largest ``max_h tau
    q_h.kappa_p + beta_p`` (ties to the smaller page) plus the fragments of mid around the complete
    pages. Needs ``0 < n_take < n_pages`` and ``fits(n_take, page_size)``; other arguments as in
    ``page_read_set``."""
    first, n_pages = complete_pages(regions.mid_start, regions.mid_end, page_size)
    if pages.kappa.shape[2] != n_pages or pages.first_complete != first:
        raise ValueError(f"compact pages {pages.first_complete}+{pages.kappa.shape[2]} do not match the mid's "
                         f"complete pages {first}+{n_pages}")
    _check_budget(n_take, n_pages, page_size)
    tile = tile or select_tile(n_take)
    u, logits, bm = compact_scores(q, pages.kappa, pages.beta, tau, sub_block=SUB_BLOCK, chained=chained)
    front = min(first * page_size, regions.mid_end) - regions.mid_start
    back = regions.mid_end - max(regions.mid_start, (first + n_pages) * page_size)
    reads = _select(q, u, bm, logits, n_pages, first, n_take, page_size, regions, front, back, chained, tile,
                    select_warps)
    reads.pages = PageEstimate(logits, pages.nu, n_pages)
    return reads


def _check_budget(n_take: int, n_pages: int, page_size: int) -> None:
    if not 0 < n_take < n_pages:
        raise ValueError(f"the selection kernels need 0 < n_take < n_pages, got {n_take} of {n_pages}")
    if not fits(n_take, page_size):
        raise ValueError(f"{n_take} pages of {page_size} tokens exceed one program's tile ({MAX_TILE})")


def _select(q, u, bm, logits, n_pages, first_page, n_take, page_size, regions, front, back, chained, tile,
            select_warps) -> KernelReadSet:
    """Launch ``select_pages_kernel`` on scores ``u`` (``logits`` given: compact)."""
    B, Hkv = u.shape[:2]
    dev = q.device
    n_anchor = regions.n_anchor
    R = n_anchor + front + n_take * page_size + back
    block_k = p2(n_take + 1)
    rows = B * Hkv
    n_sb = triton.cdiv(n_pages, SUB_BLOCK)
    idx = torch.empty(B, Hkv, R, dtype=torch.int64, device=dev)
    n_sel = torch.empty(B, Hkv, dtype=torch.int64, device=dev)
    n_read64 = torch.empty_like(n_sel)
    n_read32 = torch.empty(B, Hkv, dtype=torch.int32, device=dev)
    work = torch.empty(rows, 2 * n_pages + n_sb, dtype=torch.int64, device=dev)
    chosen = torch.empty(rows, block_k, dtype=torch.int32, device=dev)
    compact = logits is not None
    group = q.shape[1] // Hkv
    lh_args = (logits, *logits.stride()[:2], group) if compact else (u, 0, 0, 1)
    select_pages_kernel[(rows,)](
        u, bm, work, chosen, idx, n_sel, n_read64, n_read32, n_pages, u.stride(-2), n_sb, bm.stride(-2),
        n_take, R, first_page, page_size, regions.sink_end, regions.mid_start, regions.mid_end, n_anchor, front, back,
        *lh_args, SB=SUB_BLOCK, CH=tile, CHS=tile // SUB_BLOCK, BLOCK_K=block_k, BLOCK_T=p2(page_size),
        BLOCK_A=p2(n_anchor), BLOCK_PAD=p2(2 * page_size), num_warps=select_warps, GDC=chained, COMPACT=compact,
        GK=p2(group) if compact else 1, **(dict(launch_pdl=True) if chained else {}),
    )
    return KernelReadSet(idx, n_sel, n_anchor, n_read64, n_read32, chained)
