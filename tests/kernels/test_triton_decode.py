"""Parity of the fused Triton decode kernel with a float64 reference of SPEC section 5.

Runs under TRITON_INTERPRET=1 on CPU tensors (CI) and on the GPU when one is present
(``TOPKPHI_TEST_DEVICE=cpu|cuda`` overrides). The read set is given, so no selection is involved.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton is not installed: the fused decode kernel cannot run")
DEVICE = os.environ.get("TOPKPHI_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # tests/conftest.py sets it too when there is no GPU
    if os.environ["TRITON_INTERPRET"] != "1":
        pytest.skip("CPU tensors need TRITON_INTERPRET=1", allow_module_level=True)
try:
    from topkphi.backends.triton_launch import PhiInputs, fused_decode
except ImportError as exc:  # a broken triton install
    pytest.skip(f"triton is not importable: {exc}", allow_module_level=True)


# ---------------------------------------------------------------- float64 reference


def _exp_linear(x, w, b, norm_coef, scale):
    """l(x) = W x~ + b - norm_coef |x~|^2 / 2, x~ = sqrt(scale) x; x [..., d] -> [..., m]."""
    xt = math.sqrt(scale) * x
    return xt @ w.T + b - norm_coef * 0.5 * (xt * xt).sum(-1, keepdims=True)


def reference(q, k, v, idx, n_read, scale, phi=None):
    """SPEC section 5 in float64 on numpy arrays; ``phi`` is a dict of float64 arrays."""
    B, Hq, _ = q.shape
    Hkv, DV = k.shape[1], v.shape[-1]
    G = Hq // Hkv
    out, rho = np.zeros((B, Hq, DV)), np.zeros((B, Hq))
    for b in range(B):
        for h in range(Hq):
            g = h // G
            ent = np.arange(n_read[b, g])
            pos = idx[b, g, ent]
            ent, pos = ent[pos >= 0], pos[pos >= 0]
            s = scale * k[b, g, pos] @ q[b, h]
            lam, n_phi, d_phi = -np.inf, 0.0, 0.0
            if phi is not None and np.isfinite(phi["c"][b, g]):
                hp = g if phi["w_q"].shape[0] > 1 else 0
                C = phi["c"][b, g]
                lq = _exp_linear(q[b, h], phi["w_q"][hp], phi["b_q"][hp], phi["nc"], scale)
                f, lam = np.exp(lq - lq.max()), lq.max() + C
                t = pos[ent >= phi["n_anchor"][b, g]]
                lk = _exp_linear(k[b, g, t], phi["w_k"][hp], phi["b_k"][hp], phi["nc"], scale)
                w = np.exp(lk - C) @ f
                n_phi = f @ phi["s"][b, g] - w @ v[b, g, t]
                d_phi = f @ phi["z"][b, g] - w.sum()
                if d_phi <= 0:
                    n_phi, d_phi = 0.0, 0.0
            m_star = max(s.max(initial=-np.inf), lam + np.log(d_phi) if d_phi > 0 else -np.inf)
            p = np.exp(s - m_star)
            num = p @ v[b, g, pos] + (np.exp(lam - m_star) * n_phi if d_phi > 0 else 0.0)
            den = p.sum() + (np.exp(lam - m_star) * d_phi if d_phi > 0 else 0.0)
            out[b, h] = num / den
            rho[b, h] = np.exp(lam - m_star) * d_phi / den if d_phi > 0 else 0.0
    return out, rho


# ---------------------------------------------------------------- problem generator


def make_problem(
    B,
    Hkv,
    G,
    N,
    d,
    dtype,
    *,
    n_sink=4,
    n_tail=8,
    K=16,
    phi=None,
    m=24,
    score_max=None,
    seed=0,
    pad=3,
    holes=False,
    empty_summary=False,
):
    """Random cache, a read set (anchors first, then T), and a summary of mid consistent with it.

    phi: None, "shared" (prf-like, H'=1, norm_coef=1) or "per_head" (learned-like, H'=Hkv).
    """
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, G * Hkv, d))
    k = rng.standard_normal((B, Hkv, N, d))
    v = rng.standard_normal((B, Hkv, N, d))
    if score_max is not None:  # scale queries so the largest |score| is about score_max
        q *= score_max / np.abs(np.einsum("bhd,bgnd->bhgn", q, k) * d**-0.5).max()
    # quantize to the kernel's dtype, then work in float64 on exactly those values
    tq, tk, tv = (torch.from_numpy(a).to(dtype) for a in (q, k, v))
    q, k, v = (t.double().numpy() for t in (tq, tk, tv))

    mid = np.arange(n_sink, max(n_sink, N - n_tail))
    anchors = np.unique(np.r_[np.arange(min(n_sink, N)), np.arange(max(0, N - n_tail), N)])
    rows, n_read, n_anchor = [], np.zeros((B, Hkv), np.int32), np.zeros((B, Hkv), np.int32)
    for b in range(B):
        for g in range(Hkv):
            kk = min(len(mid), max(0, K - g))  # heads retrieve different counts
            t = np.sort(rng.choice(mid, kk, replace=False)) if kk else np.zeros(0, np.int64)
            ent = np.r_[anchors, t]
            if holes and len(ent) > 2:  # -1 entries inside the valid range are skipped
                ent = ent.copy()
                ent[rng.choice(len(ent), 2, replace=False)] = -1
            rows.append(ent)
            n_read[b, g], n_anchor[b, g] = len(ent), len(anchors)
    R = max(len(r) for r in rows) + pad
    R += 1 - R % 2  # odd
    idx = -np.ones((B, Hkv, R), np.int64)
    for i, r in enumerate(rows):
        idx[i // Hkv, i % Hkv, : len(r)] = r

    ph = None
    if phi is not None:
        hp = 1 if phi == "shared" else Hkv
        w = rng.standard_normal((hp, m, d))
        ph = {"w_q": w, "w_k": w, "b_q": np.full((hp, m), -0.5 * np.log(m)), "nc": 1.0}
        if phi == "per_head":
            ph.update(w_k=rng.standard_normal((hp, m, d)) * 0.5, b_q=rng.standard_normal((hp, m)), nc=0.0)
            ph["w_q"] = w * 0.5
        ph["b_k"] = ph["b_q"] if phi == "shared" else rng.standard_normal((hp, m))
        S, z, c = np.zeros((B, Hkv, m, d)), np.zeros((B, Hkv, m)), np.full((B, Hkv), -np.inf)
        for b in range(B):
            for g in range(Hkv):
                if len(mid) == 0 or empty_summary:
                    continue
                h_ = g if hp > 1 else 0
                lk = _exp_linear(k[b, g, mid], ph["w_k"][h_], ph["b_k"][h_], ph["nc"], d**-0.5)
                c[b, g] = lk.max()
                e = np.exp(lk - c[b, g])
                S[b, g], z[b, g] = e.T @ v[b, g, mid], e.sum(0)
        ph.update(s=S, z=z, c=c, n_anchor=n_anchor)
    return (tq, tk, tv), (q, k, v), idx, n_read, ph


def to_phi_inputs(ph, device):
    t = lambda a, dt=torch.float32: torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731
    return PhiInputs(
        t(ph["w_q"]),
        t(ph["b_q"]),
        t(ph["w_k"]),
        t(ph["b_k"]),
        ph["nc"],
        t(ph["s"]),
        t(ph["z"]),
        t(ph["c"]),
        t(ph["n_anchor"], torch.int32),
    )


def run_case(
    B=1,
    Hkv=2,
    G=4,
    N=200,
    d=64,
    dtype=torch.float32,
    phi=None,
    split=None,
    idx_dtype=torch.int32,
    n_read_none=False,
    stream_wk=False,
    phi_dot16=True,
    **kw,
):
    (tq, tk, tv), (q, k, v), idx, n_read, ph = make_problem(B, Hkv, G, N, d, dtype, phi=phi, **kw)
    ref_out, ref_rho = reference(q, k, v, idx, n_read, d**-0.5, ph)
    dev = DEVICE
    t_idx = torch.as_tensor(idx, dtype=idx_dtype, device=dev)
    t_nr = None if n_read_none else torch.as_tensor(n_read, device=dev)
    if n_read_none:
        ref_out, ref_rho = reference(q, k, v, idx, np.full_like(n_read, idx.shape[-1]), d**-0.5, ph)
    out, rho = fused_decode(
        tq.to(dev),
        tk.to(dev),
        tv.to(dev),
        t_idx,
        t_nr,
        scale=d**-0.5,
        phi=None if ph is None else to_phi_inputs(ph, dev),
        split=split,
        block_n=16,
        stream_wk=stream_wk,
        phi_dot16=phi_dot16,
    )
    assert out.dtype == dtype and out.shape == ref_out.shape and rho.shape == ref_rho.shape
    out, rho = out.double().cpu().numpy(), rho.double().cpu().numpy()
    assert np.isfinite(out).all() and np.isfinite(rho).all()
    err = np.linalg.norm(out - ref_out) / np.linalg.norm(ref_out)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert err <= tol, f"relative error {err:.2e} > {tol}"
    assert np.abs(rho - ref_rho).max() <= 10 * tol
    return err, ref_rho


# ---------------------------------------------------------------- the matrix

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # the interpreter path casts to fp32 before dots


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("G", [1, 3, 4, 8])
@pytest.mark.parametrize("phi", [None, "shared", "per_head"])
def test_parity_fp32(d, G, phi):
    run_case(G=G, d=d, phi=phi, N=300, K=40)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("phi", [None, "shared", "per_head"])
@pytest.mark.parametrize("split", [None, 16, 32])
def test_parity_dtypes_and_split(dtype, phi, split):
    run_case(G=4, d=64, dtype=dtype, phi=phi, split=split, N=400, K=60, B=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split", [None, 16])
def test_w_k_reloaded_per_tile(dtype, split):
    run_case(G=4, d=64, dtype=dtype, phi="per_head", split=split, N=400, K=60, B=2, stream_wk=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("phi_dot16", [True, False])
def test_phi_weights_in_cache_dtype_or_tf32(dtype, phi_dot16):
    """w = f . f_k in the cache dtype (the GPU default) or in tf32; the interpreter runs fp32 dots either way."""
    run_case(G=4, d=128, dtype=dtype, phi="per_head", split=16, N=500, K=80, phi_dot16=phi_dot16, score_max=30)


def test_split_more_heads():
    for seed in range(2):
        run_case(phi="shared", split=16, seed=seed, G=8, Hkv=3)


@pytest.mark.parametrize("N", [3, 12, 13, 40, 3000])
@pytest.mark.parametrize("phi", [None, "per_head"])
def test_context_lengths(N, phi):
    """N from below sink+tail (mid and summary empty) to a few thousand; > 32 splits at N=3000."""
    big = N > 1000
    run_case(N=N, K=600 if big else 150, G=3, phi=phi, split=16 if big else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("phi", [None, "shared"])
def test_large_scores(dtype, phi):
    """Scores up to ~1e3 must not overflow the online softmax or the phi offsets."""
    run_case(dtype=dtype, phi=phi, score_max=1e3, split=16, K=30)


def test_empty_summary_is_plain_softmax():
    _, ref_rho = run_case(phi="shared", empty_summary=True, split=16)
    assert (ref_rho == 0).all()
    run_case(phi=None, split=16)


def test_holes_int64_and_n_read_none():
    run_case(phi="shared", holes=True, idx_dtype=torch.int64, split=16)
    run_case(phi=None, holes=True, n_read_none=True, pad=4)


def test_phi_mass_is_used():
    """With a consistent summary the estimated unretrieved mass is material (rho well above 0)."""
    _, ref_rho = run_case(phi="shared", N=600, K=8, G=2)
    assert ref_rho.mean() > 0.1


def test_non_contiguous_cache():
    """A cache viewed out of a larger [B, N, Hkv, d] buffer (HF layout transposed) works unchanged."""
    (tq, tk, tv), (q, k, v), idx, n_read, _ = make_problem(1, 2, 4, 100, 64, torch.float32)
    kt, vt = tk.transpose(1, 2).contiguous().transpose(1, 2), tv.transpose(1, 2).contiguous().transpose(1, 2)
    out, _ = fused_decode(
        tq.to(DEVICE),
        kt.to(DEVICE),
        vt.to(DEVICE),
        torch.as_tensor(idx, device=DEVICE),
        torch.as_tensor(n_read, device=DEVICE),
        split=16,
        block_n=16,
    )
    ref, _ = reference(q, k, v, idx, n_read, 64**-0.5)
    assert np.linalg.norm(out.double().cpu().numpy() - ref) / np.linalg.norm(ref) <= 1e-4


def test_rejects_bad_shapes():
    q, k = torch.zeros(1, 6, 64), torch.zeros(1, 4, 10, 64)
    with pytest.raises(ValueError):
        fused_decode(q, k, k, torch.zeros(1, 4, 3, dtype=torch.int32))
