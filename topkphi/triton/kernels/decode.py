"""Fused sparse decode attention with the feature-map completion (SPEC section 5), in Triton.

One program per (batch, KV head, split) serves all G query heads of the group, so each
gathered key/value row is read once. A split reduces its slice of the read set to a partial
state (``m``, ``l``, ``acc [G, dv]``, see ``merge.py``) and the feature-map subtraction partials
``wsum = sum_T w_j``, ``wv = sum_T w_j v_j``. With one split the program finalizes its rows
itself; with more, ``merge.merge_kernel`` merges them. The fitted estimates (SPEC 8, ``estimates.py``)
always take the merge: clusters add per-cluster sums of the retrieved rows to each split's partials;
compact pages run as splits of their own (``sp >= n_rsplits``) over the pages' pseudo-tokens.
Launcher: ``topkphi/triton/decode.py``.
"""

import triton
import triton.language as tl

from topkphi.triton.kernels.estimates import cluster_tile
from topkphi.triton.kernels.merge import finalize
from topkphi.triton.kernels.states import exp_diff, online_update


@triton.jit
def query_features(q, wq_ptr, bq_ptr, hp, sqrt_scale, half_nc_scale, M, D,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """f = exp(l_q - c_q) [R, BLOCK_M] and c_q [R] for fp32 queries q [R, BLOCK_D] (R >= 16 for tl.dot).

    l_q = W_q x~ + b_q - norm_coef |x~|^2 / 2 with x~ = sqrt(scale) q; params contiguous [H', M, D].
    """
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mm = offs_m < M
    wq = tl.load(wq_ptr + hp * M * D + offs_m[:, None] * D + offs_d[None, :],
                 mask=mm[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    bq = tl.load(bq_ptr + hp * M + offs_m, mask=mm, other=0.0).to(tl.float32)
    lq = tl.dot(q, tl.trans(wq), input_precision=PREC)
    lq = lq * sqrt_scale + bq[None, :] - half_nc_scale * tl.sum(q * q, 1)[:, None]
    lq = tl.where(mm[None, :], lq, float("-inf"))
    cq = tl.max(lq, 1)
    return tl.exp(lq - cq[:, None]), cq


@triton.jit
def summary_readout(f, s_ptr, z_ptr, bh, M, DV, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """f^T S [R, BLOCK_DV] and f^T z [R] for the summary of KV head bh (contiguous fp32)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_v = tl.arange(0, BLOCK_DV)
    mm = offs_m < M
    s = tl.load(s_ptr + bh * M * DV + offs_m[:, None] * DV + offs_v[None, :],
                mask=mm[:, None] & (offs_v[None, :] < DV), other=0.0)
    z = tl.load(z_ptr + bh * M + offs_m, mask=mm, other=0.0)
    return tl.dot(f, s, input_precision=PREC), tl.sum(f * z[None, :], 1)


# n_anchor moves while the cache is shorter than sink + tail: unspecialized, it compiles once. Cache
# strides stay specialized: they carry a factor d (a multiple of 16 on real models), so a growing
# cache keeps their divisibility, and the hint lets gathered rows load 16 bytes wide
@triton.jit(do_not_specialize=["n_anchor", "n_pages", "n_rsplits"])
def decode_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, nread_ptr,
    wq_ptr, bq_ptr, wk_ptr, bk_ptr, s_ptr, z_ptr, c_ptr, xm_ptr, xv_ptr,
    lab_ptr, cks_ptr, pct_ptr, psc_ptr, pvs_ptr, pqk_ptr, lh_ptr, nu_ptr,
    out_ptr, rho_ptr, lse_ptr, pm_ptr, pl_ptr, pacc_ptr, pw_ptr, pwv_ptr, plam_ptr, pfs_ptr, pfz_ptr,
    s_qb, s_qh, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_ib, s_ih, s_ir,
    s_lb, s_lh, s_ln, s_hr, s_hg, s_nb, s_nh, s_nn, s_nd,
    Hkv, G, D, DV, M, R, n_anchor, n_splits, chunk, scale, sqrt_scale, half_nc_scale,
    C, n_pages, n_rsplits, pchunk,
    GP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_PHI: tl.constexpr, PHI_PER_HEAD: tl.constexpr, HAS_EXTRA: tl.constexpr, SPLIT: tl.constexpr,
    F32_DOTS: tl.constexpr, GDC: tl.constexpr = False, PHI_DOT16: tl.constexpr = False,
    CLUSTER: tl.constexpr = False, PAGES: tl.constexpr = False, BLOCK_C: tl.constexpr = 16,
):
    """Grid (B*Hkv, n_splits): split s reduces read entries [s*chunk, min((s+1)*chunk, n_read)).

    Entries at or past ``n_anchor`` are the retrieved T, whose estimated share leaves the summary.
    With phi and splits, split 0 also reads the summary out (``f^T S``, ``f^T z``, lam) into buffers of
    their own, before the chained wait (the summary is older than the chain), so the read-out overlaps
    the selection; the splits store ``- sum w v``, ``- sum w``; the merge needs no feature-map work.
    GDC: launched as a programmatic dependent of the selection kernel: the prologue (q, f_q, W_k)
    reads only q and the map's parameters, older than that kernel, and overlaps its tail.
    PHI_DOT16 (16-bit caches): w = f . e^T on the tensor cores in the cache dtype instead of tf32.
    CLUSTER (SPLIT): labels ``lab`` beside the cache; each split stores its retrieved rows' per-cluster
    count ``pct [B*Hkv, n_splits, C]``, scaled-score sums ``psc [.., G, C]`` and value sums ``pvs [.., C, dv]``;
    split 0 reads out ``tau q.K_c`` (``cks``: the clusters' key sums) into ``pqk [B*Hq, C]`` before the wait.
    PAGES (SPLIT): splits ``n_rsplits ..`` each fold ``pchunk`` pages' pseudo-tokens (logits ``lh [B*Hkv, G,
    .]`` with the chosen pages at -inf, values ``nu [B, Hkv, n_pages, dv]``) into their partial state.
    """
    if GDC:
        tl.extra.cuda.gdc_launch_dependents()
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // Hkv
    g = bh % Hkv
    PREC: tl.constexpr = "ieee" if F32_DOTS else "tf32"
    PREC3: tl.constexpr = "ieee" if F32_DOTS else "tf32x3"

    rows = tl.arange(0, GP)
    rmask = rows < G
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_DV)
    dmask = offs_d < D
    vmask = offs_v < DV
    o_rows = bh * G + rows
    q = tl.load(q_ptr + b.to(tl.int64) * s_qb + (g * G + rows)[:, None] * s_qh + offs_d[None, :] * s_qd,
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)

    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, BLOCK_DV], tl.float32)
    wsum = tl.zeros([GP], tl.float32)
    wv = tl.zeros([GP, BLOCK_DV], tl.float32)
    if HAS_PHI:
        hp = g if PHI_PER_HEAD else 0
        f, cq = query_features(q, wq_ptr, bq_ptr, hp, sqrt_scale, half_nc_scale, M, D, BLOCK_M, BLOCK_D, PREC)
        offs_m = tl.arange(0, BLOCK_M)
        mm = offs_m < M
        # W_k [BLOCK_M, BLOCK_D] for l_k = k W_k^T: for 16-bit caches in the cache dtype, so l_k runs on
        # the tensor cores (error ~1e-3 of |l_k|)
        wk = tl.load(wk_ptr + hp * M * D + offs_m[:, None] * D + offs_d[None, :], mask=mm[:, None] & dmask[None, :],
                     other=0.0)
        wk = wk.to(tl.float32) if F32_DOTS else wk.to(k_ptr.dtype.element_ty)
        bk = tl.load(bk_ptr + hp * M + offs_m, mask=mm, other=0.0).to(tl.float32)
        if SPLIT:
            if sp == 0:  # the summary is older than the chain: read it out while the selection runs
                fs, fz = summary_readout(f, s_ptr, z_ptr, bh, M, DV, BLOCK_M, BLOCK_DV, PREC)
                c_sum = tl.load(c_ptr + bh)
                tl.store(plam_ptr + o_rows, tl.where(c_sum > float("-inf"), cq + c_sum, float("-inf")), mask=rmask)
                tl.store(pfz_ptr + o_rows, fz, mask=rmask)
                tl.store(pfs_ptr + o_rows[:, None] * DV + offs_v[None, :], fs, mask=rmask[:, None] & vmask[None, :])
    if CLUSTER:
        offs_c = tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        taken = tl.zeros([BLOCK_C], tl.float32)
        tsc = tl.zeros([GP, BLOCK_C], tl.float32)
        tv = tl.zeros([BLOCK_C, BLOCK_DV], tl.float32)
        if sp == 0:  # tau q.K_c: the key sums are older than the chain
            ks = tl.load(cks_ptr + (bh * C + offs_c)[:, None] * D + offs_d[None, :],
                         mask=cmask[:, None] & dmask[None, :], other=0.0)
            qk = tl.dot(q, tl.trans(ks), input_precision=PREC3) * scale
            tl.store(pqk_ptr + o_rows[:, None] * C + offs_c[None, :], qk, mask=rmask[:, None] & cmask[None, :])
    if GDC:
        tl.extra.cuda.gdc_wait()
    if HAS_PHI:
        c_sum = tl.load(c_ptr + bh)
        have_sum = c_sum > float("-inf")
        c_safe = tl.where(have_sum, c_sum, 0.0)
        lam = tl.where(have_sum, cq + c_sum, float("-inf"))
        t_start = tl.where(have_sum, n_anchor, 2147483647)  # an empty summary has no share to subtract

    n_valid = tl.minimum(tl.load(nread_ptr + bh), R)
    start = sp * chunk
    end = tl.where(sp < n_rsplits, tl.minimum(start + chunk, n_valid), start)  # page splits read no tokens
    k_base = k_ptr + b.to(tl.int64) * s_kb + g.to(tl.int64) * s_kh
    v_base = v_ptr + b.to(tl.int64) * s_vb + g.to(tl.int64) * s_vh
    i_base = idx_ptr + b.to(tl.int64) * s_ib + g.to(tl.int64) * s_ih
    for j0 in range(start, end, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        jm = offs_j < end
        pos = tl.load(i_base + offs_j * s_ir, mask=jm, other=-1)
        jm = jm & (pos >= 0)
        pos = pos.to(tl.int64)
        k = tl.load(k_base + pos[:, None] * s_kn + offs_d[None, :] * s_kd, mask=jm[:, None] & dmask[None, :], other=0.0)
        v = tl.load(v_base + pos[:, None] * s_vn + offs_v[None, :] * s_vd, mask=jm[:, None] & vmask[None, :], other=0.0)
        if F32_DOTS:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PREC)
        else:
            s = tl.dot(q.to(k.dtype), tl.trans(k))
        s = tl.where(jm[None, :], s * scale, float("-inf"))
        m_i, l_i, acc = online_update(s, v, m_i, l_i, acc, PREC)
        if CLUSTER:
            ret = jm & (offs_j >= n_anchor)
            lab = tl.load(lab_ptr + b.to(tl.int64) * s_lb + g.to(tl.int64) * s_lh + pos * s_ln, mask=ret, other=-1)
            taken, tsc, tv = cluster_tile(s, v, lab.to(tl.int32), ret, taken, tsc, tv, BLOCK_C, PREC, PREC3)
        if HAS_PHI:
            kf = k.to(tl.float32)
            lk = tl.dot(k, tl.trans(wk), input_precision=PREC) * sqrt_scale + bk[None, :]
            lk = lk - half_nc_scale * tl.sum(kf * kf, 1)[:, None]
            ret = jm & (offs_j >= t_start)
            e = tl.where(ret[:, None] & mm[None, :], tl.exp(lk - c_safe), 0.0)
            if PHI_DOT16:  # f and e lie in [0, 1]: the cache's 16-bit type holds them to ~0.4%
                w = tl.dot(f.to(k.dtype), tl.trans(e.to(k.dtype)))
            else:
                w = tl.dot(f, tl.trans(e), input_precision=PREC)
            wsum += tl.sum(w, 1)
            wv += tl.dot(w.to(v.dtype), v, input_precision=PREC)

    if PAGES:  # this split's pages as pseudo-tokens; for a read split the range is empty
        p_start = (sp - n_rsplits) * pchunk
        p_end = tl.where(sp >= n_rsplits, tl.minimum(p_start + pchunk, n_pages), p_start)
        h_base = lh_ptr + bh.to(tl.int64) * s_hr
        n_base = nu_ptr + b.to(tl.int64) * s_nb + g.to(tl.int64) * s_nh
        for p0 in range(p_start, p_end, BLOCK_N):
            offs_p = p0 + tl.arange(0, BLOCK_N)
            pmask = offs_p < p_end
            lg = tl.load(h_base + rows[:, None] * s_hg + offs_p[None, :], mask=rmask[:, None] & pmask[None, :],
                         other=float("-inf"))
            nu = tl.load(n_base + offs_p.to(tl.int64)[:, None] * s_nn + offs_v[None, :] * s_nd,
                         mask=pmask[:, None] & vmask[None, :], other=0.0).to(tl.float32)
            if F32_DOTS:
                m_i, l_i, acc = online_update(lg, nu, m_i, l_i, acc, PREC)
            else:  # a 16-bit cache: weights in its dtype as for tokens, nu as hi + lo halves (tensor cores)
                nu_hi = nu.to(k_ptr.dtype.element_ty)
                nu_lo = (nu - nu_hi.to(tl.float32)).to(k_ptr.dtype.element_ty)
                m_new = tl.maximum(m_i, tl.max(lg, 1))
                alpha = exp_diff(m_i, m_new)
                p16 = exp_diff(lg, m_new[:, None]).to(k_ptr.dtype.element_ty)
                l_i = l_i * alpha + tl.sum(p16.to(tl.float32), 1)
                acc = acc * alpha[:, None] + tl.dot(p16, nu_lo, acc=tl.dot(p16, nu_hi))
                m_i = m_new

    amask = rmask[:, None] & vmask[None, :]
    if SPLIT:
        p_off = (bh * n_splits + sp) * G + rows
        tl.store(pm_ptr + p_off, m_i, mask=rmask)
        tl.store(pl_ptr + p_off, l_i, mask=rmask)
        a_off = p_off[:, None] * DV + offs_v[None, :]
        tl.store(pacc_ptr + a_off, acc, mask=amask)
        if HAS_PHI:
            tl.store(pw_ptr + p_off, -wsum, mask=rmask)
            tl.store(pwv_ptr + a_off, -wv, mask=amask)
        if CLUSTER:
            c_row = bh * n_splits + sp
            tl.store(pct_ptr + c_row * C + offs_c, taken, mask=cmask)
            tl.store(psc_ptr + (c_row * G + rows)[:, None] * C + offs_c[None, :], tsc,
                     mask=rmask[:, None] & cmask[None, :])
            tl.store(pvs_ptr + (c_row * C + offs_c)[:, None] * DV + offs_v[None, :], tv,
                     mask=cmask[:, None] & vmask[None, :])
    else:
        n_phi = wv
        d_phi = wsum
        if HAS_PHI:
            fs, fz = summary_readout(f, s_ptr, z_ptr, bh, M, DV, BLOCK_M, BLOCK_DV, PREC)
            n_phi = fs - wv
            d_phi = fz - wsum
        else:
            lam = m_i  # unused placeholder
        x_m = m_i
        x_v = acc
        if HAS_EXTRA:
            x_m = tl.load(xm_ptr + o_rows, mask=rmask, other=float("-inf"))
            x_v = tl.load(xv_ptr + o_rows[:, None] * DV + offs_v[None, :], mask=amask, other=0.0)
        out, rho, lse = finalize(m_i, l_i, acc, lam, n_phi, d_phi, x_m, x_v, HAS_PHI, HAS_EXTRA)
        tl.store(out_ptr + o_rows[:, None] * DV + offs_v[None, :], out.to(out_ptr.dtype.element_ty), mask=amask)
        tl.store(rho_ptr + o_rows, rho, mask=rmask)
        tl.store(lse_ptr + o_rows, lse, mask=rmask)
