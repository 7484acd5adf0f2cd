"""Fused sparse decode attention with phi completion (SPEC section 5), in Triton.

One program per (batch, KV head, split) serves all G query heads of the group, so each
gathered key/value row is read once. A split reduces its slice of the read set to a
partial state: running max ``m``, unnormalized ``l`` and ``acc [G, dv]``, and the phi
subtraction partials ``wsum = sum_T w_j``, ``wv = sum_T w_j v_j``. The states merge with
``state_merge``; ``phi_finalize`` adds the summary's estimate and normalizes once.
Launcher: ``topkphi/backends/triton_launch.py``.
"""

import triton
import triton.language as tl


@triton.jit
def _exp_diff(a, b):
    """exp(a - b), 0 where a is -inf (b may be -inf too)."""
    return tl.where(a == float("-inf"), 0.0, tl.exp(a - tl.where(b == float("-inf"), 0.0, b)))


@triton.jit
def state_merge(m_a, l_a, acc_a, m_b, l_b, acc_b):
    """Merge two unnormalized softmax states (m [R], l [R], acc [R, dv]) into one."""
    m = tl.maximum(m_a, m_b)
    alpha = _exp_diff(m_a, m)
    beta = _exp_diff(m_b, m)
    return m, l_a * alpha + l_b * beta, acc_a * alpha[:, None] + acc_b * beta[:, None]


@triton.jit
def phi_finalize(m, lsum, acc, lam, n_phi, d_phi, HAS_PHI: tl.constexpr):
    """Add the summary's estimate (weight exp(lam), n_phi, d_phi) to a state; normalize once.

    Returns (out [R, dv], rho [R]). Non-positive d_phi or lam = -inf contribute nothing.
    """
    if HAS_PHI:
        use = (d_phi > 0.0) & (lam > float("-inf"))
        lam_d = tl.where(use, lam + tl.log(tl.where(use, d_phi, 1.0)), float("-inf"))
        m_star = tl.maximum(m, lam_d)
        a = _exp_diff(m, m_star)
        g = _exp_diff(lam_d, m_star)  # = exp(lam - m*) * d_phi
        coef = tl.where(use, g / tl.where(use, d_phi, 1.0), 0.0)  # exp(lam - m*)
        den = lsum * a + g
        num = acc * a[:, None] + coef[:, None] * tl.where(use[:, None], n_phi, 0.0)
        rho = g / tl.where(den > 0.0, den, 1.0)
    else:
        den = lsum
        num = acc
        rho = tl.zeros_like(lsum)
    out = num / tl.where(den > 0.0, den, 1.0)[:, None]
    return out, rho


@triton.jit
def query_features(
    q,
    wq_ptr,
    bq_ptr,
    hp,
    sqrt_scale,
    half_nc_scale,
    M,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    """f = exp(l_q - c_q) [R, BLOCK_M] and c_q [R] for fp32 queries q [R, BLOCK_D].

    l_q = W_q x~ + b_q - norm_coef |x~|^2 / 2 with x~ = sqrt(scale) q; params contiguous [H', M, D].
    USE_DOT needs R >= 16 on the GPU; without it a broadcast product serves R = 1.
    """
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mm = offs_m < M
    wq = tl.load(
        wq_ptr + hp * M * D + offs_m[:, None] * D + offs_d[None, :], mask=mm[:, None] & (offs_d[None, :] < D), other=0.0
    ).to(tl.float32)
    bq = tl.load(bq_ptr + hp * M + offs_m, mask=mm, other=0.0).to(tl.float32)
    if USE_DOT:
        lq = tl.dot(q, tl.trans(wq), input_precision=PREC)
    else:
        lq = tl.sum(q[:, None, :] * wq[None, :, :], 2)
    lq = lq * sqrt_scale + bq[None, :] - half_nc_scale * tl.sum(q * q, 1)[:, None]
    lq = tl.where(mm[None, :], lq, float("-inf"))
    cq = tl.max(lq, 1)
    return tl.exp(lq - cq[:, None]), cq


@triton.jit
def _load_wk(wk_ptrs, wk_mask, k_ptr, F32_DOTS: tl.constexpr):
    """W_k [BLOCK_M, BLOCK_D] for l_k = k W_k^T: for 16-bit caches in the cache dtype, so l_k runs on the
    tensor cores (error ~1e-3 of |l_k|)."""
    wk = tl.load(wk_ptrs, mask=wk_mask, other=0.0)
    return wk.to(tl.float32) if F32_DOTS else wk.to(k_ptr.dtype.element_ty)


@triton.jit
def summary_readout(
    f, s_ptr, z_ptr, bh, M, DV, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr, USE_DOT: tl.constexpr
):
    """f^T S [R, BLOCK_DV] and f^T z [R] for the summary of KV head bh (contiguous fp32)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_v = tl.arange(0, BLOCK_DV)
    mm = offs_m < M
    s = tl.load(
        s_ptr + bh * M * DV + offs_m[:, None] * DV + offs_v[None, :],
        mask=mm[:, None] & (offs_v[None, :] < DV),
        other=0.0,
    )
    z = tl.load(z_ptr + bh * M + offs_m, mask=mm, other=0.0)
    if USE_DOT:
        fs = tl.dot(f, s, input_precision=PREC)
    else:
        fs = tl.sum(f[:, :, None] * s[None, :, :], 1)
    return fs, tl.sum(f * z[None, :], 1)


@triton.jit
def finish_rows(
    m_i,
    l_i,
    acc,
    wsum,
    wv,
    f,
    lam,
    s_ptr,
    z_ptr,
    out_ptr,
    rho_ptr,
    bh,
    G,
    M,
    DV,
    rows,
    rmask,
    offs_v,
    vmask,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr,
    HAS_PHI: tl.constexpr,
):
    """Read the summary out for f, merge it into the state, normalize, store out and rho rows."""
    if HAS_PHI:
        fs, fz = summary_readout(f, s_ptr, z_ptr, bh, M, DV, BLOCK_M, BLOCK_DV, PREC, True)
        out, rho = phi_finalize(m_i, l_i, acc, lam, fs - wv, fz - wsum, True)
    else:
        out, rho = phi_finalize(m_i, l_i, acc, m_i, acc, l_i, False)
    o_rows = bh * G + rows
    tl.store(
        out_ptr + o_rows[:, None] * DV + offs_v[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=rmask[:, None] & vmask[None, :],
    )
    tl.store(rho_ptr + o_rows, rho, mask=rmask)


# cache strides stay specialized: they carry a factor d (a multiple of 16 on real models), so a
# growing cache does not change their divisibility, and the hint lets gathered rows load 16 bytes wide
@triton.jit
def decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    idx_ptr,
    nread_ptr,
    wq_ptr,
    bq_ptr,
    wk_ptr,
    bk_ptr,
    s_ptr,
    z_ptr,
    c_ptr,
    nanc_ptr,
    out_ptr,
    rho_ptr,
    pm_ptr,
    pl_ptr,
    pacc_ptr,
    pw_ptr,
    pwv_ptr,
    plam_ptr,
    pfs_ptr,
    pfz_ptr,
    s_qb,
    s_qh,
    s_qd,
    s_kb,
    s_kh,
    s_kn,
    s_kd,
    s_vb,
    s_vh,
    s_vn,
    s_vd,
    s_ib,
    s_ih,
    s_ir,
    Hkv,
    G,
    D,
    DV,
    M,
    R,
    n_splits,
    chunk,
    scale,
    sqrt_scale,
    half_nc_scale,
    GP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_PHI: tl.constexpr,
    PHI_PER_HEAD: tl.constexpr,
    SPLIT: tl.constexpr,
    F32_DOTS: tl.constexpr,
    STREAM_WK: tl.constexpr = False,
    GDC: tl.constexpr = False,
    PHI_DOT16: tl.constexpr = False,
):
    """Grid (B*Hkv, n_splits): split s reduces read entries [s*chunk, min((s+1)*chunk, n_read)).

    With phi and splits, split 0 also reads the summary out (``f^T S``, ``f^T z``, lam) into buffers of
    their own, before the chained wait (the summary is older than the chain), so the read-out overlaps
    the selection; the splits store ``- sum w v``, ``- sum w``; the merge needs no feature-map work.
    GDC: launched as a programmatic dependent of the selection kernel: the prologue (q, f_q, W_k)
    reads only q and the map's parameters, older than that kernel, and overlaps its tail.
    PHI_DOT16 (16-bit caches): w = f . e^T on the tensor cores in the cache dtype instead of tf32.
    """
    if GDC:
        tl.extra.cuda.gdc_launch_dependents()
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // Hkv
    g = bh % Hkv
    PREC: tl.constexpr = "ieee" if F32_DOTS else "tf32"

    rows = tl.arange(0, GP)
    rmask = rows < G
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_DV)
    dmask = offs_d < D
    vmask = offs_v < DV
    q = tl.load(
        q_ptr + b.to(tl.int64) * s_qb + (g * G + rows)[:, None] * s_qh + offs_d[None, :] * s_qd,
        mask=rmask[:, None] & dmask[None, :],
        other=0.0,
    ).to(tl.float32)

    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, BLOCK_DV], tl.float32)
    wsum = tl.zeros([GP], tl.float32)
    wv = tl.zeros([GP, BLOCK_DV], tl.float32)
    if HAS_PHI:
        hp = g if PHI_PER_HEAD else 0
        f, cq = query_features(q, wq_ptr, bq_ptr, hp, sqrt_scale, half_nc_scale, M, D, BLOCK_M, BLOCK_D, PREC, True)
        offs_m = tl.arange(0, BLOCK_M)
        mm = offs_m < M
        wk_ptrs = wk_ptr + hp * M * D + offs_m[:, None] * D + offs_d[None, :]
        wk_mask = mm[:, None] & dmask[None, :]
        if not STREAM_WK:
            wk = _load_wk(wk_ptrs, wk_mask, k_ptr, F32_DOTS)
        bk = tl.load(bk_ptr + hp * M + offs_m, mask=mm, other=0.0).to(tl.float32)
        if SPLIT:
            if sp == 0:  # the summary is older than the chain: read it out while the selection runs
                fs, fz = summary_readout(f, s_ptr, z_ptr, bh, M, DV, BLOCK_M, BLOCK_DV, PREC, True)
                c_sum = tl.load(c_ptr + bh)
                o_rows = bh * G + rows
                tl.store(plam_ptr + o_rows, tl.where(c_sum > float("-inf"), cq + c_sum, float("-inf")), mask=rmask)
                tl.store(pfz_ptr + o_rows, fz, mask=rmask)
                tl.store(pfs_ptr + o_rows[:, None] * DV + offs_v[None, :], fs, mask=rmask[:, None] & vmask[None, :])
    if GDC:
        tl.extra.cuda.gdc_wait()
    if HAS_PHI:
        c_sum = tl.load(c_ptr + bh)
        have_sum = c_sum > float("-inf")
        c_safe = tl.where(have_sum, c_sum, 0.0)
        lam = tl.where(have_sum, cq + c_sum, float("-inf"))
        # entries at or past t_start are the retrieved T; none when the summary is empty
        t_start = tl.where(have_sum, tl.load(nanc_ptr + bh), 2147483647)

    n_valid = tl.minimum(tl.load(nread_ptr + bh), R)
    start = sp * chunk
    end = tl.minimum(start + chunk, n_valid)
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
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = _exp_diff(m_i, m_new)
        p = _exp_diff(s, m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
        if HAS_PHI:
            if STREAM_WK:  # reloaded per tile (an L1/L2 hit) instead of held: fewer registers per program
                wk = _load_wk(wk_ptrs, wk_mask, k_ptr, F32_DOTS)
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

    if SPLIT:
        p_off = (bh * n_splits + sp) * G + rows
        tl.store(pm_ptr + p_off, m_i, mask=rmask)
        tl.store(pl_ptr + p_off, l_i, mask=rmask)
        a_off = p_off[:, None] * DV + offs_v[None, :]
        amask = rmask[:, None] & vmask[None, :]
        tl.store(pacc_ptr + a_off, acc, mask=amask)
        if HAS_PHI:
            tl.store(pw_ptr + p_off, -wsum, mask=rmask)
            tl.store(pwv_ptr + a_off, -wv, mask=amask)
    else:
        if not HAS_PHI:
            f = acc  # unused placeholders
            lam = m_i
        finish_rows(
            m_i,
            l_i,
            acc,
            wsum,
            wv,
            f,
            lam,
            s_ptr,
            z_ptr,
            out_ptr,
            rho_ptr,
            bh,
            G,
            M,
            DV,
            rows,
            rmask,
            offs_v,
            vmask,
            BLOCK_M,
            BLOCK_DV,
            PREC,
            HAS_PHI,
        )


@triton.jit
def merge_kernel(
    out_ptr,
    rho_ptr,
    pm_ptr,
    pl_ptr,
    pacc_ptr,
    pw_ptr,
    pwv_ptr,
    plam_ptr,
    pfs_ptr,
    pfz_ptr,
    G,
    DV,
    n_splits,
    BLOCK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_PHI: tl.constexpr,
    GDC: tl.constexpr = False,
):
    """Grid (B*Hq,): merge one query head's n_splits partial states, add phi, normalize.

    Row vectors are kept 2-D ([1, ...]) so the helpers serve both kernels unchanged.
    GDC: launched as a programmatic dependent of the decode kernel.
    """
    if GDC:
        tl.extra.cuda.gdc_wait()
    bq_head = tl.program_id(0)  # = (b * Hkv + g) * G + r
    bh = bq_head // G
    r = bq_head % G
    offs_v = tl.arange(0, BLOCK_DV)
    vmask = offs_v < DV
    offs_s = tl.arange(0, BLOCK_S)

    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([1, BLOCK_DV], tl.float32)
    d_phi = tl.zeros([1], tl.float32)
    n_phi = tl.zeros([1, BLOCK_DV], tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        sm = (s0 + offs_s) < n_splits
        p_off = (bh * n_splits + s0 + offs_s) * G + r  # [BLOCK_S]
        pm = tl.load(pm_ptr + p_off, mask=sm, other=float("-inf"))
        pl = tl.load(pl_ptr + p_off, mask=sm, other=0.0)
        a_off = p_off[:, None] * DV + offs_v[None, :]
        amask = sm[:, None] & vmask[None, :]
        pacc = tl.load(pacc_ptr + a_off, mask=amask, other=0.0)
        # merge this chunk's states into one, then into the running state
        cm = tl.max(pm, 0, keep_dims=True)
        wgt = _exp_diff(pm, cm)
        m_i, l_i, acc = state_merge(
            m_i, l_i, acc, cm, tl.sum(pl * wgt, 0, keep_dims=True), tl.sum(pacc * wgt[:, None], 0, keep_dims=True)
        )
        if HAS_PHI:  # the phi partials are additive
            d_phi += tl.sum(tl.load(pw_ptr + p_off, mask=sm, other=0.0), 0, keep_dims=True)
            n_phi += tl.sum(tl.load(pwv_ptr + a_off, mask=amask, other=0.0), 0, keep_dims=True)

    if HAS_PHI:  # plus the summary's readout f^T z, f^T S (stored by split 0)
        one = tl.zeros([1], tl.int32)
        d_phi += tl.load(pfz_ptr + bq_head + one)
        n_phi += tl.load(pfs_ptr + bq_head * DV + offs_v[None, :], mask=vmask[None, :], other=0.0)
        lam = tl.load(plam_ptr + bq_head + one)
        out, rho = phi_finalize(m_i, l_i, acc, lam, n_phi, d_phi, True)
    else:
        out, rho = phi_finalize(m_i, l_i, acc, m_i, acc, l_i, False)
    tl.store(out_ptr + bq_head * DV + offs_v[None, :], out.to(out_ptr.dtype.element_ty), mask=vmask[None, :])
    tl.store(rho_ptr + bq_head + tl.zeros([1], tl.int32), rho)
