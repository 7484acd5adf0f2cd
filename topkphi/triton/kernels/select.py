"""Page selection of one decode step (SPEC section 3, ``page``) in Triton, without a sort.

``select_pages_kernel``, grid ``(B*Hkv,)``: from the bounds ``u`` and their sub-block maxima (both
written by ``bounds.py``), the ``n_take`` pages of largest bound, ties to the smaller page (see its
docstring), expanded to the read index ``idx [B*Hkv, R]`` int64 = sink+tail anchors, the pages' mid
tokens ascending, -1 padding, with the per-head counts of the step. Launcher:
``topkphi/triton/select.py``.
"""

import triton
import triton.language as tl


@triton.jit
def _write_read_index(keys, row, bh, idx_ptr, n_sel_ptr, n_read64_ptr, n_read32_ptr, n_take, R, first_page,
                      page_size, sink_end, mid_start, mid_end, n_anchor, front, back, BLOCK_K: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_PAD: tl.constexpr, COMPACT: tl.constexpr):
    """Expand the chosen pages (``keys [BLOCK_K]``, ascending, the first ``n_take`` valid) into the
    read index ``[anchors | mid tokens ascending | -1 ...]`` and store the head's counts. COMPACT: the
    pages are complete ones; the ``front`` and ``back`` fragments of mid around them (SPEC 8.2) are
    read too, before and after them."""
    # tokens of the chosen pages, clipped to mid; only page 0 (start) and the last page (end)
    # can be partial, so dropping page 0's leading tokens is the only shift
    j = tl.arange(0, BLOCK_K)[:, None]
    t = tl.arange(0, BLOCK_T)[None, :]
    pos = (keys.to(tl.int64) + first_page)[:, None] * page_size + t
    ok = (j < n_take) & (t < page_size) & (pos >= mid_start) & (pos < mid_end)
    out = idx_ptr + row * R
    if COMPACT:
        dest = n_anchor + front + j * page_size + t
    else:
        shift = tl.where(tl.min(keys, axis=0) == 0, mid_start - first_page * page_size, 0)
        dest = n_anchor + j * page_size + t - shift
    tl.store(out + dest, pos, mask=ok)
    n_sel = tl.sum(tl.sum(ok.to(tl.int32), axis=1), axis=0)
    if COMPACT:
        f = tl.arange(0, BLOCK_T)
        tl.store(out + n_anchor + f, (mid_start + f).to(tl.int64), mask=f < front)
        tl.store(out + n_anchor + front + n_sel + f, (mid_end - back + f).to(tl.int64), mask=f < back)
        n_sel += front + back
    pad = n_anchor + n_sel + tl.arange(0, BLOCK_PAD)
    tl.store(out + pad, tl.full([BLOCK_PAD], -1, tl.int64), mask=pad < R)
    a = tl.arange(0, BLOCK_A)
    anchor = tl.where(a < sink_end, a, mid_end + a - sink_end)
    tl.store(out + a, anchor.to(tl.int64), mask=a < n_anchor)
    # int64 counts for the step's statistics, int32 for the decode kernel, which may launch chained
    # onto this one: all written here, so no other kernel runs in the step for them
    n_read = n_sel + n_anchor
    tl.store(n_sel_ptr + bh, n_sel.to(tl.int64))
    tl.store(n_read64_ptr + bh, n_read.to(tl.int64))
    tl.store(n_read32_ptr + bh, n_read.to(tl.int32))


@triton.jit
def _order_key(x):
    """float32 -> int32 increasing with x (-0.0 and +0.0 share a key); -inf stays above INT32_MIN,
    which marks padding."""
    bits = (x + 0.0).to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _kth_largest_key(ptr, n, kth, CH: tl.constexpr):
    """The ``kth`` largest of ``n >= kth`` keys at ``ptr`` (int64 memory), bit by bit from the top, a
    chunk at a time from memory: the slow path, for rows with many ties or very many sub-blocks."""
    offs = tl.arange(0, CH)
    x = tl.full([], -2147483648, tl.int64)
    step = tl.full([], 2147483648, tl.int64)
    for _ in range(32):
        c = x + step
        cnt = tl.full([], 0, tl.int32)
        for start in range(0, n, CH):
            o = start + offs
            cnt += tl.sum((tl.load(ptr + o, mask=o < n, other=-2147483648) >= c).to(tl.int32), axis=0)
        x = tl.where(cnt >= kth, c, x)
        step = step // 2
    return x


@triton.jit
def _search_tile(keys, kth, lo, hi, stop_at):
    """Narrow ``[lo, hi)`` around the ``kth`` largest of an int32 register tile of keys (padding
    INT32_MIN), keeping ``count(keys >= lo) >= kth > count(keys >= hi)``; three probes per pass, their
    counts packed into one int64 reduction. Stops once ``count(keys >= lo) <= stop_at`` or the interval
    is one key wide (then lo is the kth largest). Returns ``lo`` (int64)."""
    cnt = tl.sum((keys >= lo.to(tl.int32)).to(tl.int32), axis=0)
    while (hi - lo > 1) & (cnt > stop_at):
        w = hi - lo
        p1 = lo + w // 4
        p2 = lo + w // 2
        p3 = lo + w - w // 4
        packed = tl.sum((keys >= p1.to(tl.int32)).to(tl.int64) + ((keys >= p2.to(tl.int32)).to(tl.int64) << 16)
                        + ((keys >= p3.to(tl.int32)).to(tl.int64) << 32), axis=0)
        c1 = (packed & 0xFFFF).to(tl.int32)
        c2 = ((packed >> 16) & 0xFFFF).to(tl.int32)
        c3 = (packed >> 32).to(tl.int32)
        new_lo = tl.where(c3 >= kth, p3, tl.where(c2 >= kth, p2, tl.where(c1 >= kth, p1, lo)))
        new_hi = tl.where(c3 >= kth, hi, tl.where(c2 >= kth, p3, tl.where(c1 >= kth, p2, p1)))
        cnt = tl.where(c3 >= kth, c3, tl.where(c2 >= kth, c2, tl.where(c1 >= kth, c1, cnt)))
        lo = new_lo
        hi = new_hi
    return lo


@triton.jit(do_not_specialize=["n_pages", "n_sb", "first_page", "sink_end", "mid_start", "mid_end", "front",
                               "back"])
def select_pages_kernel(
    u_ptr,
    bm_ptr,
    work_ptr,
    pages_ptr,
    idx_ptr,
    n_sel_ptr,
    n_read64_ptr,
    n_read32_ptr,
    n_pages,
    u_stride,
    n_sb,
    bm_stride,
    n_take,
    R,
    first_page,
    page_size,
    sink_end,
    mid_start,
    mid_end,
    n_anchor,
    front,
    back,
    lh_ptr,
    lh_row,
    lh_g,
    G,
    SB: tl.constexpr,
    CH: tl.constexpr,
    CHS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_PAD: tl.constexpr,
    GDC: tl.constexpr = False,
    COMPACT: tl.constexpr = False,
    GK: tl.constexpr = 1,
):
    """The ``n_take`` pages of largest bound, ties to the smaller page, without a sort of the row.

    1. ``t`` = the n_take-th largest sub-block maximum. Those n_take sub-blocks hold n_take distinct
       pages with bound >= t, so every chosen page has bound >= t: a safe threshold.
    2. Only the sub-blocks whose maximum reaches ``t`` are read again (about n_take of them), as one
       register tile in page order; every page outside them is below ``t``.
    3. ``m`` = the n_take-th largest bound in the tile (the value at the cut), by a search on keys that
       stops early where exactly n_take pages reach it.
    4. Chosen = bound > m, then the first pages with bound == m in page order: the SPEC's ties,
       already in page order, so nothing is sorted.
    Rows with more than CH sub-blocks or more than CHS candidate sub-blocks (long runs of ties) take
    a chunked path through ``work_ptr`` (int64 ``[rows, 2 * n_pages + n_sb]``): slower, same pages.
    GDC: launched as a programmatic dependent of the bound kernel (waits for it before any access).
    COMPACT: ``u`` are compact page scores (SPEC 8.2): the read index takes the fragments of mid around
    the complete pages, and the chosen pages' per-head logits ``lh [rows, G, .]`` become -inf (they are
    read exactly, so the decode's pseudo-tokens leave them out)."""
    if GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    bh = tl.program_id(0)
    row = bh.to(tl.int64)
    u_row = u_ptr + row * u_stride
    bm_row = bm_ptr + row * bm_stride
    keys_ptr = work_ptr + row * (2 * n_pages + n_sb)
    cpage_ptr = keys_ptr + n_pages
    sbc_ptr = cpage_ptr + n_pages
    pages_row = pages_ptr + row * BLOCK_K
    offs = tl.arange(0, CH)

    # 1. a safe threshold: any t with count(sub-block maxima >= t) >= n_take. The search stops as soon
    # as few enough sub-blocks reach t to fit the tile. INT32_MIN + 1 sits below every page: with too
    # few sub-blocks, all pages are candidates
    sb_ok = offs < n_sb
    bm_keys = tl.where(sb_ok, _order_key(tl.load(bm_row + offs, mask=sb_ok, other=0.0)), -2147483648)
    t_key = tl.full([], -2147483647, tl.int64)
    if n_sb >= n_take:
        if n_sb <= CH:
            lo = tl.min(tl.where(sb_ok, bm_keys, 2147483647), axis=0).to(tl.int64)
            t_key = _search_tile(bm_keys, n_take, lo, tl.max(bm_keys, axis=0).to(tl.int64) + 1, CHS)
        else:
            for start in range(0, n_sb, CH):
                o = start + offs
                tl.store(sbc_ptr + o, _order_key(tl.load(bm_row + o, mask=o < n_sb, other=0.0)).to(tl.int64),
                         mask=o < n_sb)
            tl.debug_barrier()
            t_key = _kth_largest_key(sbc_ptr, n_sb, n_take, CH)
            tl.debug_barrier()

    # 2. the sub-blocks that reach t, compacted in order
    hit = sb_ok & (bm_keys >= t_key.to(tl.int32))
    tl.store(sbc_ptr + tl.cumsum(hit.to(tl.int32), axis=0) - 1, offs.to(tl.int64), mask=hit)
    n_csb = tl.sum(hit.to(tl.int32), axis=0)
    for start in range(CH, n_sb, CH):
        o = start + offs
        ok = o < n_sb
        hit = ok & (_order_key(tl.load(bm_row + o, mask=ok, other=float("-inf"))) >= t_key)
        tl.store(sbc_ptr + n_csb + tl.cumsum(hit.to(tl.int32), axis=0) - 1, o.to(tl.int64), mask=hit)
        n_csb += tl.sum(hit.to(tl.int32), axis=0)
    tl.debug_barrier()

    js = tl.arange(0, CHS)[:, None]
    ii = tl.arange(0, SB)[None, :]
    if n_csb <= CHS:
        # 3-4 on one register tile of [candidate sub-block, page], in page order
        sb = tl.load(sbc_ptr + js, mask=js < n_csb, other=0)
        page = tl.reshape(sb * SB + ii, [CHS * SB])
        ok = tl.reshape((js < n_csb) & (ii < SB), [CHS * SB]) & (page < n_pages)
        key = tl.where(ok, _order_key(tl.load(u_row + page, mask=ok, other=0.0)), -2147483648)
        # stops at the exact cut value, or earlier where exactly n_take keys reach lo (no tie at the cut)
        m_key = _search_tile(key, n_take, t_key, tl.max(key, axis=0).to(tl.int64) + 1, n_take)
        m32 = m_key.to(tl.int32)
        need = n_take - tl.sum((key > m32).to(tl.int32), axis=0)
        eq = key == m32
        chosen = (key > m32) | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= need))
        tl.store(pages_row + tl.cumsum(chosen.to(tl.int32), axis=0) - 1, page.to(tl.int32), mask=chosen)
    else:
        # the pages at or above t, compacted into work, then the same steps chunk by chunk
        n_cand = tl.full([], 0, tl.int32)
        for start in range(0, n_csb, CHS):
            jj = start + js
            sb = tl.load(sbc_ptr + jj, mask=jj < n_csb, other=0)
            page = tl.reshape(sb * SB + ii, [CHS * SB])
            ok = tl.reshape((jj < n_csb) & (ii < SB), [CHS * SB]) & (page < n_pages)
            key = _order_key(tl.load(u_row + page, mask=ok, other=float("-inf"))).to(tl.int64)
            hit = ok & (key >= t_key)
            rank = n_cand + tl.cumsum(hit.to(tl.int32), axis=0) - 1
            tl.store(keys_ptr + rank, key, mask=hit)
            tl.store(cpage_ptr + rank, page, mask=hit)
            n_cand += tl.sum(hit.to(tl.int32), axis=0)
        tl.debug_barrier()
        m_key = _kth_largest_key(keys_ptr, n_cand, n_take, CH)
        n_gt = tl.full([], 0, tl.int32)
        for start in range(0, n_cand, CH):
            o = start + offs
            n_gt += tl.sum(((o < n_cand) & (tl.load(keys_ptr + o, mask=o < n_cand, other=-2147483648) > m_key))
                           .to(tl.int32))
        need = n_take - n_gt
        n_eq = tl.full([], 0, tl.int32)
        n_chosen = tl.full([], 0, tl.int32)
        for start in range(0, n_cand, CH):
            o = start + offs
            ok = o < n_cand
            key = tl.load(keys_ptr + o, mask=ok, other=-2147483648)
            eq = ok & (key == m_key)
            chosen = ok & ((key > m_key) | (eq & (n_eq + tl.cumsum(eq.to(tl.int32), axis=0) <= need)))
            rank = n_chosen + tl.cumsum(chosen.to(tl.int32), axis=0) - 1
            tl.store(pages_row + rank, tl.load(cpage_ptr + o, mask=chosen, other=0).to(tl.int32), mask=chosen)
            n_eq += tl.sum(eq.to(tl.int32), axis=0)
            n_chosen += tl.sum(chosen.to(tl.int32), axis=0)
    tl.debug_barrier()
    kk = tl.arange(0, BLOCK_K)
    keys = tl.load(pages_row + kk, mask=kk < n_take, other=n_pages)  # ascending already
    if COMPACT:
        gg = tl.arange(0, GK)[None, :]
        tl.store(lh_ptr + row * lh_row + gg * lh_g + keys[:, None], tl.full([BLOCK_K, GK], float("-inf"), tl.float32),
                 mask=(kk < n_take)[:, None] & (gg < G))
    _write_read_index(keys, row, bh, idx_ptr, n_sel_ptr, n_read64_ptr, n_read32_ptr, n_take, R, first_page,
                      page_size, sink_end, mid_start, mid_end, n_anchor, front, back, BLOCK_K, BLOCK_T, BLOCK_A,
                      BLOCK_PAD, COMPACT)
