"""Page selection (SPEC section 3, ``page``) in Triton: the Quest bound and the read-index build.

``page_bounds_kernel``: grid ``(B*Hkv, cdiv(n_pages, BLOCK_P * blocks_per_prog))``. Each program
reads tiles of ``kmin``/``kmax`` once, in the cache's own dtype, and computes for all G query heads
of its KV head ``u_p = tau * max_h sum_i max(q_hi kmin_pi, q_hi kmax_pi)`` in fp32 (the literal SPEC
formula, no matmul, no fp32 copy of the metadata), then stores ``u [B*Hkv, n_pages]`` fp32 and, for
the threshold selection, the maximum of every run of SB pages.

``select_pages_kernel`` (the default selection): grid ``(B*Hkv,)``; see its docstring.

``read_index_kernel`` (the ``topk`` selector): grid ``(B*Hkv,)``. Input: the ``n_take + 1`` largest bounds of the
head (``torch.topk``, unsorted; or two topks, per chunk of the row then over the chunk
winners). With ``m1`` the smallest of them, the ``n_take`` best pages are the candidates
above ``m1`` unless ``m1`` occurs twice or more among the candidates (a tie at the cut); only
then the row of ``u`` is scanned for the first tied pages in page order (ties to the smaller
page, as the SPEC asks). The chosen pages are sorted in registers and expanded to
``idx [B*Hkv, R]`` int64 = sink+tail anchors, the pages' mid tokens ascending, -1 padding,
together with the per-head counts the decode step reports. Launchers:
``topkphi/backends/triton_select.py``.
"""

import triton
import triton.language as tl


# sizes that move with the context would otherwise recompile the kernel whenever their
# divisibility by 16 changes: a second of compilation in the middle of a chat. Strides stay
# specialized: the launchers pad rows to multiples of 16 and cache strides carry a factor d, and
# without the divisibility hint every metadata load is a scalar 2-byte load (4x slower, measured)
@triton.jit(do_not_specialize=["n_pages", "blocks_per_prog"])
def page_bounds_kernel(
    q_ptr,
    kmin_ptr,
    kmax_ptr,
    u_ptr,
    bm_ptr,
    bm_stride,
    sqb,
    sqh,
    sqd,
    snb,
    snh,
    snp,
    snd,
    sxb,
    sxh,
    sxp,
    sxd,
    Hkv,
    n_pages,
    u_stride,
    D,
    tau,
    blocks_per_prog,
    G: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SB: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    USE_DOT: tl.constexpr = False,
    GP: tl.constexpr = 16,
    DOT_F32: tl.constexpr = False,
    GDC: tl.constexpr = False,
):
    if GDC:  # let the selection kernel launch now; it waits for this grid before reading u and bm
        tl.extra.cuda.gdc_launch_dependents()
    bh = tl.program_id(0)
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    if USE_DOT:
        # kmin <= kmax, so max(q kmin, q kmax) = q+ kmax + q- kmin: two products on the tensor cores
        # in place of 4 G fp32 ops per metadata element, which bound the elementwise form below
        # the memory rate. q+ and q- are q's own values (q has the metadata's dtype), so every
        # product is exact in the fp32 accumulator; only the order of the fp32 sum differs.
        offs_g = tl.arange(0, GP)
        g_ok = offs_g < G
        qt = tl.load(q_ptr + b * sqb + (h * G + offs_g)[None, :] * sqh + offs_d[:, None] * sqd,
                     mask=d_ok[:, None] & g_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_D, GP]
        q_pos = tl.where(qt > 0.0, qt, 0.0)
        q_neg = tl.where(qt < 0.0, qt, 0.0)
        if not DOT_F32:
            q_pos = q_pos.to(kmin_ptr.dtype.element_ty)
            q_neg = q_neg.to(kmin_ptr.dtype.element_ty)
    # a program walks several blocks of pages so that the pipeliner keeps the next tiles' loads in
    # flight while this one is reduced: the bound is a pure stream of the metadata
    for i in tl.range(0, blocks_per_prog, num_stages=NUM_STAGES):
        pb = tl.program_id(1) * blocks_per_prog + i
        offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = offs_p < n_pages
        tile_ok = p_ok[:, None] & d_ok[None, :]
        rows = offs_p.to(tl.int64)[:, None]
        kmn = tl.load(kmin_ptr + b * snb + h * snh + rows * snp + offs_d[None, :] * snd, mask=tile_ok, other=0.0)
        kmx = tl.load(kmax_ptr + b * sxb + h * sxh + rows * sxp + offs_d[None, :] * sxd, mask=tile_ok, other=0.0)
        if USE_DOT:
            if DOT_F32:  # the interpreter: its 16-bit tl.dot is wrong, the same products in fp32 are exact
                kmn = kmn.to(tl.float32)
                kmx = kmx.to(tl.float32)
                s = tl.dot(kmx, q_pos, input_precision="ieee")
                s = tl.dot(kmn, q_neg, acc=s, input_precision="ieee")  # [BLOCK_P, GP]
            else:
                s = tl.dot(kmn, q_neg, acc=tl.dot(kmx, q_pos))
            u = tl.max(tl.where(g_ok[None, :], s, float("-inf")), axis=1)
        else:
            kmn = kmn.to(tl.float32)
            kmx = kmx.to(tl.float32)
            u = tl.full([BLOCK_P], float("-inf"), tl.float32)
            for g in tl.static_range(G):
                qg = tl.load(q_ptr + b * sqb + (h * G + g) * sqh + offs_d * sqd, mask=d_ok, other=0.0).to(tl.float32)
                s = tl.sum(tl.maximum(qg[None, :] * kmn, qg[None, :] * kmx), axis=1)
                u = tl.maximum(u, s)
        # entries past n_pages (row padding) hold -inf
        u = tl.where(p_ok, u * tau, float("-inf"))
        tl.store(u_ptr + bh.to(tl.int64) * u_stride + offs_p, u, mask=offs_p < u_stride)
        if SB > 0:  # maxima of sub-blocks of SB pages: what select_pages_kernel thresholds on
            bm = tl.max(tl.reshape(u, [BLOCK_P // SB, SB]), axis=1)
            offs_b = pb * (BLOCK_P // SB) + tl.arange(0, BLOCK_P // SB)
            tl.store(bm_ptr + bh.to(tl.int64) * bm_stride + offs_b, bm, mask=offs_b < bm_stride)


@triton.jit(do_not_specialize=["n_pages", "n_first", "first_page", "sink_end", "mid_start", "mid_end"])
def read_index_kernel(
    vals_ptr,
    cand_ptr,
    first_idx_ptr,
    u_ptr,
    scratch_ptr,
    idx_ptr,
    n_sel_ptr,
    n_read_ptr,
    n_read32_ptr,
    n_anchor32_ptr,
    te_ptr,
    n_pages,
    u_stride,
    n_cand,
    n_first,
    chunk,
    n_take,
    R,
    first_page,
    page_size,
    sink_end,
    mid_start,
    mid_end,
    n_anchor,
    te_summary,
    te_selection,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr,
    TWO_STAGE: tl.constexpr,
):
    bh = tl.program_id(0)
    row = bh.to(tl.int64)
    ck = tl.arange(0, BLOCK_K)
    c_ok = ck < n_cand
    vals = tl.load(vals_ptr + row * n_cand + ck, mask=c_ok, other=float("inf"))
    cand = tl.load(cand_ptr + row * n_cand + ck, mask=c_ok, other=0).to(tl.int32)
    if TWO_STAGE:  # cand indexes the per-chunk winners [n_chunks, n_cand] of the first topk
        inner = tl.load(first_idx_ptr + row * n_first + cand, mask=c_ok, other=0).to(tl.int32)
        cand = (cand // n_cand) * chunk + inner
    m1 = tl.min(vals, axis=0)
    n_eq = tl.sum((c_ok & (vals == m1)).to(tl.int32), axis=0)
    above = c_ok & (vals > m1)
    big = n_pages  # sorts after every page
    keys = tl.where(above, cand, big)
    if n_eq > 1:  # the cut falls inside a run of equal bounds: first tied pages in page order
        n_above = tl.sum(above.to(tl.int32), axis=0)
        need = n_take - n_above
        base = scratch_ptr + row * BLOCK_K
        rank = tl.cumsum(above.to(tl.int32), axis=0) - 1
        tl.store(base + need + rank, cand, mask=above)
        taken = n_above * 0
        for start in range(0, n_pages, BLOCK_S):
            offs = start + tl.arange(0, BLOCK_S)
            in_row = offs < n_pages
            uu = tl.load(u_ptr + row * u_stride + offs, mask=in_row, other=float("-inf"))
            tie = in_row & (uu == m1)
            c = taken + tl.cumsum(tie.to(tl.int32), axis=0)
            tl.store(base + c - 1, offs, mask=tie & (c <= need))
            taken += tl.sum(tie.to(tl.int32), axis=0)
        tl.debug_barrier()
        keys = tl.load(base + ck, mask=ck < n_take, other=big)
    keys = tl.sort(keys)  # ascending: the n_take chosen pages first
    _write_read_index(keys, row, bh, idx_ptr, n_sel_ptr, n_read_ptr, n_read32_ptr, n_anchor32_ptr, te_ptr, n_take,
                      R, first_page, page_size, sink_end, mid_start, mid_end, n_anchor, te_summary, te_selection,
                      BLOCK_K, BLOCK_T, BLOCK_A, BLOCK_PAD)


@triton.jit
def _write_read_index(keys, row, bh, idx_ptr, n_sel_ptr, n_read_ptr, n_read32_ptr, n_anchor32_ptr, te_ptr, n_take,
                      R, first_page, page_size, sink_end, mid_start, mid_end, n_anchor, te_summary, te_selection,
                      BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr,
                      BLOCK_PAD: tl.constexpr):
    """Expand the chosen pages (``keys [BLOCK_K]``, ascending, the first ``n_take`` valid) into the
    read index ``[anchors | mid tokens ascending | -1 ...]`` and store the step's counts."""
    # tokens of the chosen pages, clipped to mid; only page 0 (start) and the last page (end)
    # can be partial, so dropping page 0's leading tokens is the only shift
    j = tl.arange(0, BLOCK_K)[:, None]
    t = tl.arange(0, BLOCK_T)[None, :]
    pos = (keys.to(tl.int64) + first_page)[:, None] * page_size + t
    ok = (j < n_take) & (t < page_size) & (pos >= mid_start) & (pos < mid_end)
    front = mid_start - first_page * page_size
    shift = tl.where(tl.min(keys, axis=0) == 0, front, 0)
    dest = n_anchor + j * page_size + t - shift
    out = idx_ptr + row * R
    tl.store(out + dest, pos, mask=ok)
    n_sel = tl.sum(tl.sum(ok.to(tl.int32), axis=1), axis=0)
    pad = n_anchor + n_sel + tl.arange(0, BLOCK_PAD)
    tl.store(out + pad, tl.full([BLOCK_PAD], -1, tl.int64), mask=pad < R)
    a = tl.arange(0, BLOCK_A)
    anchor = tl.where(a < sink_end, a, mid_end + a - sink_end)
    tl.store(out + a, anchor.to(tl.int64), mask=a < n_anchor)

    n_read = n_sel + n_anchor
    tl.store(n_sel_ptr + bh, n_sel.to(tl.int64))
    tl.store(n_read_ptr + bh, n_read.to(tl.int64))
    tl.store(n_read32_ptr + bh, n_read.to(tl.int32))
    tl.store(n_anchor32_ptr + bh, (n_sel * 0 + n_anchor).to(tl.int32))
    tl.store(te_ptr + bh, (n_read.to(tl.float32) + te_summary) + te_selection)


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


@triton.jit(do_not_specialize=["n_pages", "n_sb", "first_page", "sink_end", "mid_start", "mid_end"])
def select_pages_kernel(
    u_ptr,
    bm_ptr,
    work_ptr,
    pages_ptr,
    idx_ptr,
    n_sel_ptr,
    n_read_ptr,
    n_read32_ptr,
    n_anchor32_ptr,
    te_ptr,
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
    te_summary,
    te_selection,
    SB: tl.constexpr,
    CH: tl.constexpr,
    CHS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_PAD: tl.constexpr,
    GDC: tl.constexpr = False,
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
    GDC: launched as a programmatic dependent of the bound kernel (waits for it before any access)."""
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
    _write_read_index(keys, row, bh, idx_ptr, n_sel_ptr, n_read_ptr, n_read32_ptr, n_anchor32_ptr, te_ptr, n_take,
                      R, first_page, page_size, sink_end, mid_start, mid_end, n_anchor, te_summary, te_selection,
                      BLOCK_K, BLOCK_T, BLOCK_A, BLOCK_PAD)
