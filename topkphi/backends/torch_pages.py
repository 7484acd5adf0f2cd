"""Page metadata of the torch backend: Quest bounds (SPEC 3) and compact page tokens (SPEC 8.2).

Every array lives in a buffer with spare room behind a prefix view (grown by doubling), so a
decode-time append writes only the touched pages and positions: the old summary is consumed.
Bounds keep the cache's dtype; compact tokens and the attention mass are float32.
"""

from __future__ import annotations

import torch

from topkphi.backends import torch_fit as fit
from topkphi.backends import torch_ops as ops
from topkphi.config import Config, Dims
from topkphi.regions import Regions, page_span
from topkphi.summary import CompactPages, PageBounds, ReferenceQueries, complete_pages

F32 = torch.float32


def empty_pages(cfg: Config, dims: Dims, like: torch.Tensor) -> PageBounds | CompactPages:
    """Empty metadata with room for the pages of a ``dims.n_tokens`` cache (and a quarter more)."""
    lead, d, dv = (dims.batch, dims.n_kv_heads), dims.d, dims.dv
    mid_end = max(cfg.n_sink, dims.n_tokens - cfg.n_tail)
    if cfg.selection == "page":
        cap = page_span(cfg.n_sink, mid_end, cfg.page_size)[1]
        return PageBounds(*(ops.spare(lead, cap, (d,), like.device, like.dtype)[:, :, :0] for _ in range(2)))
    first, cap = complete_pages(cfg.n_sink, mid_end, cfg.page_size)
    return CompactPages(ops.spare(lead, cap, (d,), like.device, F32)[:, :, :0],
                        ops.spare(lead, cap, (), like.device, F32)[:, :, :0],
                        ops.spare(lead, cap, (dv,), like.device, F32)[:, :, :0],
                        ops.spare(lead, dims.n_tokens, (), like.device, F32), first)


def fold_pages(pages, mid_start: int, k: torch.Tensor, v: torch.Tensor, lo: int, hi: int, cfg: Config):
    """Metadata after ``[lo, hi)`` entered mid (``mid_start`` the summary's)."""
    if isinstance(pages, PageBounds):
        return _fold_bounds(pages, mid_start, k, lo, hi, cfg.page_size)
    return _fold_compact(pages, mid_start, k, v, lo, hi, cfg.page_size)


def _fold_bounds(pages: PageBounds, mid_start: int, k, lo: int, hi: int, page_size: int) -> PageBounds:
    """kmin/kmax after folding ``[lo, hi)``: only the touched pages are recomputed."""
    first, n_pages = page_span(mid_start, hi, page_size)
    p0 = max(lo // page_size, first)
    kmin_new, kmax_new = ops.page_extrema(k, max(p0 * page_size, mid_start), hi, p0, page_size)
    views = []
    for old, new in ((pages.kmin, kmin_new), (pages.kmax, kmax_new)):
        if old.dtype != k.dtype or old.device != k.device:
            old = old.to(device=k.device, dtype=k.dtype)
        view = ops.extended(old, n_pages)
        view[:, :, p0 - first:] = new
        views.append(view)
    return PageBounds(*views)


def _fold_compact(pages: CompactPages, mid_start: int, k, v, lo: int, hi: int, page_size: int) -> CompactPages:
    """Fit the pages completed by ``[lo, hi)`` from the mass their positions received."""
    first, n_old = complete_pages(mid_start, lo, page_size)
    _, n_new = complete_pages(mid_start, hi, page_size)
    mass = _mass(pages, k.shape[2], k.device)
    if n_new == n_old:
        return CompactPages(pages.kappa, pages.beta, pages.nu, mass, first)
    span = slice((first + n_old) * page_size, (first + n_new) * page_size)
    batch, n_kv = k.shape[:2]
    shape = (batch, n_kv, n_new - n_old, page_size)
    kappa, beta, nu = fit.fit_compact_pages(k[:, :, span].to(F32).reshape(*shape, -1),
                                            v[:, :, span].to(F32).reshape(*shape, -1),
                                            mass[:, :, span].reshape(shape))
    out = []
    for old, new in ((pages.kappa, kappa), (pages.beta, beta), (pages.nu, nu)):
        view = ops.extended(old.to(device=k.device, dtype=F32), n_new)
        view[:, :, n_old:] = new
        out.append(view)
    return CompactPages(*out, mass, first)


def _mass(pages: CompactPages, n_tokens: int, device) -> torch.Tensor:
    return ops.extended(pages.mass.to(device=device, dtype=F32), n_tokens)


def add_query_mass(pages: CompactPages, k: torch.Tensor, queries: ReferenceQueries, cfg: Config) -> CompactPages:
    """Add ``a_j = sum_{h,r} exp(s_hrj - L_hr)`` of the reference rows (causal) to each position's mass."""
    q_rows, positions = fit.reference_rows(queries, k.shape[1])
    mass = _mass(pages, k.shape[2], k.device)
    for _, s, lse in fit.reference_chunks(q_rows, positions, k, cfg.tau(k.shape[3])):
        mass += torch.exp(s - lse[..., None]).sum(2)  # in place: the buffer behind the view
    return CompactPages(pages.kappa, pages.beta, pages.nu, mass, pages.first_complete)


def add_tail_mass(pages: CompactPages, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, regions: Regions,
                  tau: float) -> CompactPages:
    """Add this step's exact tail probabilities ``exp(s - lse)``, summed over the group, to the mass."""
    batch, n_q, d = q.shape
    n_kv = k.shape[1]
    q_g = q.to(F32).reshape(batch, n_kv, n_q // n_kv, d)
    tail = k[:, :, regions.mid_end:regions.n_tokens].to(F32)
    prob = torch.exp(tau * q_g @ tail.transpose(-1, -2) - lse.reshape(batch, n_kv, -1, 1).to(F32))
    mass = _mass(pages, k.shape[2], k.device)
    mass[:, :, regions.mid_end:regions.n_tokens] += prob.sum(2)
    return CompactPages(pages.kappa, pages.beta, pages.nu, mass, pages.first_complete)


def compact_selection(q_g: torch.Tensor, pages: CompactPages, regions: Regions, n_take: int, page_size: int,
                      tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T [B,H,*] ascending, -1 padded; counts [B,H])``: the ``n_take`` complete pages of largest
    ``max_h tau q_h . kappa_p + beta_p`` plus the partial fragments at both ends of mid (SPEC 8.2)."""
    score = tau * q_g @ pages.kappa.transpose(-1, -2) + pages.beta[:, :, None]
    chosen = ops.topk_ascending(score.amax(2), n_take)
    chosen = torch.where(chosen >= 0, chosen + pages.first_complete, -1)
    first, n_pages = complete_pages(regions.mid_start, regions.mid_end, page_size)
    pos = (chosen[..., None] * page_size + torch.arange(page_size, device=q_g.device)).flatten(-2)
    pos = torch.where(chosen.repeat_interleave(page_size, dim=-1) >= 0, pos, -1)
    front = torch.arange(regions.mid_start, min(first * page_size, regions.mid_end), device=q_g.device)
    back = torch.arange(max(regions.mid_start, (first + n_pages) * page_size), regions.mid_end, device=q_g.device)
    lead = pos.shape[:2]
    return ops.packed(torch.cat([front.expand(*lead, -1), pos, back.expand(*lead, -1)], dim=-1))
