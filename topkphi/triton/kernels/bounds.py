"""The Quest page bound (SPEC section 3, ``page``) in Triton.

``page_bounds_kernel``: grid ``(B*Hkv, cdiv(n_pages, BLOCK_P * blocks_per_prog))``. Each program
reads tiles of ``kmin``/``kmax`` once, in the cache's own dtype, and computes for all G query heads
of its KV head ``u_p = tau * max_h sum_i max(q_hi kmin_pi, q_hi kmax_pi)`` in fp32 (elementwise, or
as two tensor-core products ``q+ kmax + q- kmin`` for 16-bit metadata), then stores ``u [B*Hkv,
n_pages]`` fp32 and, for the threshold selection (``select.py``), the maximum of every run of SB
pages. With ``COMPACT`` it scores compact page tokens instead (SPEC 8.2): ``kmin`` is the pages' key
``kappa``, ``u_p = max_h (tau q_h.kappa_p + beta_p)``, and every head's logit is stored as well (``lh [B*Hkv,
G, .]``): the decode's pseudo-tokens. Launchers: ``page_bounds``, ``compact_scores`` in ``topkphi/triton/select.py``.
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
    beta_ptr,
    sbb,
    sbh,
    sbp,
    lh_ptr,
    lh_row,
    lh_g,
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
    COMPACT: tl.constexpr = False,
    TOKEN_PREC: tl.constexpr = "ieee",
):
    if GDC:  # let the selection kernel launch now; it waits for this grid before reading u and bm
        tl.extra.cuda.gdc_launch_dependents()
    bh = tl.program_id(0)
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    if USE_DOT or COMPACT:
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
        if not DOT_F32 and not COMPACT:
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
        if COMPACT:  # one product with the page tokens, fp32 sums
            if TOKEN_PREC == "split16":  # fp32 tokens, 16-bit q: kappa = hi + lo in q's dtype, two exact products
                q16 = qt.to(q_ptr.dtype.element_ty)
                k_hi = kmn.to(q_ptr.dtype.element_ty)
                k_lo = (kmn - k_hi.to(tl.float32)).to(q_ptr.dtype.element_ty)
                s = tl.dot(k_lo, q16, acc=tl.dot(k_hi, q16))
            elif DOT_F32:
                s = tl.dot(kmn.to(tl.float32), qt, input_precision=TOKEN_PREC)
            else:
                s = tl.dot(kmn, qt.to(kmn.dtype))
            beta = tl.load(beta_ptr + b * sbb + h * sbh + offs_p * sbp, mask=p_ok, other=0.0).to(tl.float32)
            lg = s * tau + beta[:, None]  # [BLOCK_P, GP]
            tl.store(lh_ptr + bh.to(tl.int64) * lh_row + offs_g[None, :] * lh_g + offs_p[:, None], lg,
                     mask=p_ok[:, None] & g_ok[None, :])
            u = tl.max(tl.where(g_ok[None, :], lg, float("-inf")), axis=1)
        else:
            kmx = tl.load(kmax_ptr + b * sxb + h * sxh + rows * sxp + offs_d[None, :] * sxd, mask=tile_ok, other=0.0)
        if USE_DOT and not COMPACT:
            if DOT_F32:  # the interpreter: its 16-bit tl.dot is wrong, the same products in fp32 are exact
                kmn = kmn.to(tl.float32)
                kmx = kmx.to(tl.float32)
                s = tl.dot(kmx, q_pos, input_precision="ieee")
                s = tl.dot(kmn, q_neg, acc=s, input_precision="ieee")  # [BLOCK_P, GP]
            else:
                s = tl.dot(kmn, q_neg, acc=tl.dot(kmx, q_pos))
            u = tl.max(tl.where(g_ok[None, :], s, float("-inf")), axis=1) * tau
        elif not COMPACT:
            kmn = kmn.to(tl.float32)
            kmx = kmx.to(tl.float32)
            u = tl.full([BLOCK_P], float("-inf"), tl.float32)
            for g in tl.static_range(G):
                qg = tl.load(q_ptr + b * sqb + (h * G + g) * sqh + offs_d * sqd, mask=d_ok, other=0.0).to(tl.float32)
                s = tl.sum(tl.maximum(qg[None, :] * kmn, qg[None, :] * kmx), axis=1)
                u = tl.maximum(u, s)
            u = u * tau
        # entries past n_pages (row padding) hold -inf
        u = tl.where(p_ok, u, float("-inf"))
        tl.store(u_ptr + bh.to(tl.int64) * u_stride + offs_p, u, mask=offs_p < u_stride)
        if SB > 0:  # maxima of sub-blocks of SB pages: what select_pages_kernel thresholds on
            bm = tl.max(tl.reshape(u, [BLOCK_P // SB, SB]), axis=1)
            offs_b = pb * (BLOCK_P // SB) + tl.arange(0, BLOCK_P // SB)
            tl.store(bm_ptr + bh.to(tl.int64) * bm_stride + offs_b, bm, mask=offs_b < bm_stride)
