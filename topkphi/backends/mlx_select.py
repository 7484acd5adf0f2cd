"""The MLX selector (SPEC 3, 8.2): its page metadata and the read set, float32.

Quest pages are cut by absolute position (``first_page = mid_start // P``); compact pages are the
complete pages of mid (``topkphi.summary.complete_pages``), each fitted once, when it leaves the
tail, from the attention mass its positions received (``CompactPages.mass``).

The read set has the one layout of ``topkphi.step``: ``idx [B,Hkv,R]`` int32 holds the
``n_anchor`` sink then tail positions, then the retrieved mid positions ``T`` ascending, then -1
padding. The width of ``T`` is fixed by the plan (no device sync to trim it): page selections cut
by a region boundary leave -1 at the end.
"""

from __future__ import annotations

import mlx.core as mx

from topkphi.backends.mlx_fit import fit_compact_pages
from topkphi.backends.mlx_ops import f32, grown, pack, reference_rows, reference_scores, top_mask
from topkphi.config import Config, Dims
from topkphi.regions import Regions
from topkphi.step import ReadSet, StepPlan
from topkphi.summary import CompactPages, PageBounds, ReferenceQueries, Summary, complete_pages


def read_set(q_g: mx.array, k: mx.array, summary: Summary, plan: StepPlan, cfg: Config, tau: float) -> ReadSet:
    """The step's read set; ``q_g [B,Hkv,G,d]`` float32, ``k [B,Hkv,N,d]``."""
    batch, n_kv = k.shape[:2]
    r = plan.regions
    if plan.selection == "all":
        selected = mx.broadcast_to(mx.arange(r.mid_start, r.mid_end, dtype=mx.int32), (batch, n_kv, r.n_mid))
        n_sel = mx.full((batch, n_kv), r.n_mid, dtype=mx.int32)
    elif plan.selection == "exact":
        selected, n_sel = select_exact(q_g, k, r, plan.n_take, tau)
    elif plan.selection == "page":
        pages = summary.pages
        selected, n_sel = select_pages(q_g, f32(pages.kmin), f32(pages.kmax), summary.first_page, r,
                                       cfg.page_size, plan.n_take, tau)
    else:
        selected, n_sel = select_compact(q_g, summary, r, cfg.page_size, plan.n_take, tau)
    anchors = mx.concatenate([mx.arange(0, r.sink_end, dtype=mx.int32),
                              mx.arange(r.mid_end, r.n_tokens, dtype=mx.int32)])
    anchors = mx.broadcast_to(anchors, (batch, n_kv, anchors.size))
    return ReadSet(mx.concatenate([anchors, selected], axis=2), n_sel, int(r.n_anchor))


def select_exact(q_g: mx.array, k: mx.array, r: Regions, n_take: int, tau: float):
    """``(T [B,H,n_take] ascending, n_selected [B,H])``: best keys by their group's max score."""
    k_mid = f32(k[:, :, r.mid_start:r.mid_end])
    best = (tau * (q_g @ k_mid.swapaxes(-1, -2))).max(axis=2)  # [B,H,n_mid]
    positions = mx.arange(r.mid_start, r.mid_end, dtype=mx.int32)
    return pack(positions, top_mask(best, n_take), n_take), mx.full(best.shape[:2], n_take, dtype=mx.int32)


def select_pages(q_g, kmin, kmax, first_page: int, r: Regions, page_size: int, n_take: int, tau: float):
    """Quest page selection: ``(T [B,H,W] ascending, -1 padded, n_selected [B,H])``."""
    # sum_i max(q_i kmin_i, q_i kmax_i) = relu(q) . kmax + min(q, 0) . kmin: two matmuls
    bound = mx.maximum(q_g, 0.0) @ kmax.swapaxes(-1, -2) + mx.minimum(q_g, 0.0) @ kmin.swapaxes(-1, -2)
    best = (tau * bound).max(axis=2)  # [B,H,n_pages]
    n_pages = best.shape[-1]
    pages = pack(mx.arange(first_page, first_page + n_pages, dtype=mx.int32), top_mask(best, n_take), n_take)
    pos = (pages[..., None] * page_size + mx.arange(page_size, dtype=mx.int32)).reshape(*pages.shape[:2], -1)
    valid = (pos >= r.mid_start) & (pos < r.mid_end)
    width = min(n_take * page_size, r.n_mid)
    return pack(pos, valid, width), valid.astype(mx.int32).sum(axis=-1)


def select_compact(q_g, summary: Summary, r: Regions, page_size: int, n_take: int, tau: float):
    """SPEC 8.2: the ``n_take`` complete pages of largest ``max_h tau q_h . kappa_p + beta_p``, plus
    the partial-page fragments at both mid ends; ``(T [B,H,W] ascending, n_selected [B,H])``.

    Every entry is valid: complete pages lie wholly inside mid."""
    pages = summary.pages
    score = (tau * (q_g @ f32(pages.kappa).swapaxes(-1, -2)) + f32(pages.beta)[:, :, None, :]).max(axis=2)
    n_pages = score.shape[-1]
    first = pages.first_complete
    chosen = pack(mx.arange(first, first + n_pages, dtype=mx.int32), top_mask(score, n_take), n_take)
    pos = (chosen[..., None] * page_size + mx.arange(page_size, dtype=mx.int32)).reshape(*chosen.shape[:2], -1)
    first_c, n_complete = complete_pages(r.mid_start, r.mid_end, page_size)
    front = mx.arange(r.mid_start, min(first_c * page_size, r.mid_end), dtype=mx.int32)
    back = mx.arange(max(r.mid_start, (first_c + n_complete) * page_size), r.mid_end, dtype=mx.int32)
    batch, n_kv = pos.shape[:2]
    front, back = (mx.broadcast_to(x, (batch, n_kv, x.size)) for x in (front, back))
    selected = mx.concatenate([front, pos, back], axis=2)
    return selected, mx.full((batch, n_kv), selected.shape[2], dtype=mx.int32)

# ------------------------------------------------------------ page metadata


def empty_pages(cfg: Config, dims: Dims) -> PageBounds | CompactPages:
    b, h, d, dv = dims.batch, dims.n_kv_heads, dims.d, dims.dv
    if cfg.selection == "page":
        return PageBounds(mx.zeros((b, h, 0, d), dtype=mx.float32), mx.zeros((b, h, 0, d), dtype=mx.float32))
    first, _ = complete_pages(cfg.n_sink, cfg.n_sink, cfg.page_size)
    return CompactPages(mx.zeros((b, h, 0, d), dtype=mx.float32), mx.zeros((b, h, 0), dtype=mx.float32),
                        mx.zeros((b, h, 0, dv), dtype=mx.float32), mx.zeros((b, h, dims.n_tokens), dtype=mx.float32),
                        first)


def fold_bounds(pages: PageBounds, k: mx.array, lo: int, hi: int, mid_start: int, page_size: int) -> PageBounds:
    """Page kmin/kmax after folding positions ``[lo, hi)`` of ``k [B,H,N,d]`` (pages by absolute position).

    Only the new keys are read; the page that held the previous end is merged with its old bounds."""
    if hi <= lo:
        return pages
    kmin, kmax = f32(pages.kmin), f32(pages.kmax)
    first = mid_start // page_size
    p_lo, p_hi = lo // page_size, (hi - 1) // page_size + 1
    start = p_lo * page_size  # pad the first touched page back to its boundary
    batch, heads, _, d = k.shape
    k_new = f32(k[:, :, lo:hi])
    n_new = p_hi - p_lo

    def padded(fill: float) -> mx.array:
        front = mx.full((batch, heads, lo - start, d), fill, dtype=mx.float32)
        back = mx.full((batch, heads, p_hi * page_size - hi, d), fill, dtype=mx.float32)
        return mx.concatenate([front, k_new, back], axis=2).reshape(batch, heads, n_new, page_size, d)

    new_min, new_max = padded(float("inf")).min(axis=3), padded(-float("inf")).max(axis=3)
    kept = kmin.shape[2]
    overlap = kept - (p_lo - first)  # 0 or 1: the partially folded page, merged with its old bounds
    if overlap > 0:
        new_min = mx.concatenate([mx.minimum(new_min[:, :, :1], kmin[:, :, -1:]), new_min[:, :, 1:]], axis=2)
        new_max = mx.concatenate([mx.maximum(new_max[:, :, :1], kmax[:, :, -1:]), new_max[:, :, 1:]], axis=2)
    keep = kept - max(overlap, 0)
    return PageBounds(mx.concatenate([kmin[:, :, :keep], new_min], axis=2),
                      mx.concatenate([kmax[:, :, :keep], new_max], axis=2))


def fold_compact(pages: CompactPages, summary: Summary, k: mx.array, v: mx.array, lo: int, hi: int,
                 page_size: int) -> CompactPages:
    """Fit the pages completed by ``[lo, hi)`` entering mid from the mass their positions received."""
    first, n_old = complete_pages(summary.mid_start, lo, page_size)
    _, n_new = complete_pages(summary.mid_start, hi, page_size)
    mass = grown(f32(pages.mass), k.shape[2], 0.0)
    if n_new == n_old:
        return CompactPages(pages.kappa, pages.beta, pages.nu, mass, first)
    a, b = (first + n_old) * page_size, (first + n_new) * page_size
    batch, heads = k.shape[:2]
    n = n_new - n_old
    kappa, beta, nu = fit_compact_pages(k[:, :, a:b].reshape(batch, heads, n, page_size, -1),
                                        v[:, :, a:b].reshape(batch, heads, n, page_size, -1),
                                        mass[:, :, a:b].reshape(batch, heads, n, page_size))
    return CompactPages(mx.concatenate([f32(pages.kappa), kappa], axis=2),
                        mx.concatenate([f32(pages.beta), beta], axis=2),
                        mx.concatenate([f32(pages.nu), nu], axis=2), mass, first)


def add_query_mass(pages: CompactPages, k: mx.array, queries: ReferenceQueries, tau: float) -> CompactPages:
    """Add ``a_j = sum_{h,r} exp(s_hrj - L_hr)`` of the reference queries (SPEC 8) to every position."""
    rows = reference_rows(queries.q, k.shape[1])
    window = queries.window
    positions = mx.tile(mx.arange(queries.end - window, queries.end), rows.shape[2] // window)
    s, lse = reference_scores(rows, positions, k, tau)
    received = mx.exp(s - lse[..., None]).sum(axis=2)  # [B,H,N]
    mass = grown(f32(pages.mass), k.shape[2], 0.0)
    mass[:, :, : k.shape[2]] = mass[:, :, : k.shape[2]] + received
    return CompactPages(pages.kappa, pages.beta, pages.nu, mass, pages.first_complete)


def add_tail_mass(pages: CompactPages, q: mx.array, k: mx.array, lse: mx.array, regions: Regions,
                  tau: float) -> CompactPages:
    """Add this step's exact probabilities of the tail positions, summed over the group (SPEC 8.2)."""
    batch, n_q, d = q.shape
    n_kv = k.shape[1]
    q_g = f32(q).reshape(batch, n_kv, n_q // n_kv, d)
    lo, hi = regions.mid_end, regions.n_tokens
    scores = tau * (q_g @ f32(k[:, :, lo:hi]).swapaxes(-1, -2))  # [B,H,G,n_tail]
    prob = mx.exp(scores - lse.reshape(batch, n_kv, -1)[..., None]).sum(axis=2)
    mass = grown(f32(pages.mass), k.shape[2], 0.0)
    mass[:, :, lo:hi] = mass[:, :, lo:hi] + prob
    return CompactPages(pages.kappa, pages.beta, pages.nu, mass, pages.first_complete)
