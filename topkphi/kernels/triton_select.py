"""Page selection (SPEC section 3, ``page``) in Triton: the Quest bound and the read-index build.

``page_bounds_kernel``: grid ``(B*Hkv, cdiv(n_pages, BLOCK_P))``. Each program reads a tile of
``kmin``/``kmax`` once, in the cache's own dtype, and computes for all G query heads of its KV
head ``u_p = tau * max_h sum_i max(q_hi kmin_pi, q_hi kmax_pi)`` in fp32 (the literal SPEC
formula, no matmul, no fp32 copy of the metadata), then stores ``u [B*Hkv, n_pages]`` fp32.

``read_index_kernel``: grid ``(B*Hkv,)``. Input: the ``n_take + 1`` largest bounds of the
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
# divisibility by 16 changes: a second of compilation in the middle of a chat
@triton.jit(do_not_specialize=["n_pages", "u_stride", "snb", "snh", "sxb", "sxh"])
def page_bounds_kernel(
    q_ptr,
    kmin_ptr,
    kmax_ptr,
    u_ptr,
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
    G: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    pb = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    p_ok = offs_p < n_pages
    d_ok = offs_d < D
    tile_ok = p_ok[:, None] & d_ok[None, :]
    rows = offs_p.to(tl.int64)[:, None]
    kmn = tl.load(kmin_ptr + b * snb + h * snh + rows * snp + offs_d[None, :] * snd, mask=tile_ok, other=0.0)
    kmx = tl.load(kmax_ptr + b * sxb + h * sxh + rows * sxp + offs_d[None, :] * sxd, mask=tile_ok, other=0.0)
    kmn = kmn.to(tl.float32)
    kmx = kmx.to(tl.float32)
    u = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for g in tl.static_range(G):
        qg = tl.load(q_ptr + b * sqb + (h * G + g) * sqh + offs_d * sqd, mask=d_ok, other=0.0).to(tl.float32)
        s = tl.sum(tl.maximum(qg[None, :] * kmn, qg[None, :] * kmx), axis=1)
        u = tl.maximum(u, s)
    # entries past n_pages (row padding for a chunked topk) hold -inf
    tl.store(u_ptr + bh.to(tl.int64) * u_stride + offs_p, tl.where(p_ok, u * tau, float("-inf")),
             mask=offs_p < u_stride)


@triton.jit(do_not_specialize=["n_pages", "u_stride", "n_first", "first_page", "sink_end", "mid_start", "mid_end"])
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
