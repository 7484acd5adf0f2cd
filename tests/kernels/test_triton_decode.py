"""Parity of the fused Triton decode kernel with a float64 reference of SPEC section 5.

The reference computes the estimates in float64 and merges them with the oracle's ``merge``
(``topkphi.backends.numpy_backend``). Runs under TRITON_INTERPRET=1 on CPU tensors (CI) and on the
GPU when one is present (``TOPKPHI_TEST_DEVICE=cpu|cuda`` overrides). The read set is given, so no
selection is involved.
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

from topkphi.backends.numpy_backend import merge  # noqa: E402
from topkphi.triton.decode import Estimate, FeatureMapInputs, fused_decode  # noqa: E402

# ---------------------------------------------------------------- float64 reference


def _exp_linear(x, w, b, norm_coef, scale):
    """l(x) = W x~ + b - norm_coef |x~|^2 / 2, x~ = sqrt(scale) x; x [..., d] -> [..., m]."""
    xt = math.sqrt(scale) * x
    return xt @ w.T + b - norm_coef * 0.5 * (xt * xt).sum(-1, keepdims=True)


def reference(q, k, v, idx, n_read, scale, phi=None, extra=None):
    """SPEC 5 in float64: ``(out, rho, lse)``; ``phi`` a dict of float64 arrays, ``extra`` an
    ``(lam, n_phi, d_phi)`` of numpy arrays merged with the feature map's estimate into one."""
    B, Hq, d = q.shape
    Hkv = k.shape[1]
    G, R = Hq // Hkv, idx.shape[-1]
    entry = np.arange(R)
    valid = (idx >= 0) & (entry < n_read[..., None])
    safe = np.where(valid, idx, 0)[..., None]
    k_read, v_read = np.take_along_axis(k, safe, 2), np.take_along_axis(v, safe, 2)
    q_g = q.reshape(B, Hkv, G, d)
    scores = np.where(valid[:, :, None], scale * np.einsum("bhgd,bhrd->bhgr", q_g, k_read), -np.inf)
    lam, n_phi, d_phi = np.full((B, Hkv, G), -np.inf), np.zeros((B, Hkv, G, v.shape[-1])), np.zeros((B, Hkv, G))
    for b, g in np.ndindex(B, Hkv):
        if phi is None or not np.isfinite(phi["c"][b, g]):
            continue
        hp = g if phi["w_q"].shape[0] > 1 else 0
        lq = _exp_linear(q_g[b, g], phi["w_q"][hp], phi["b_q"][hp], phi["nc"], scale)  # [G, m]
        f = np.exp(lq - lq.max(-1, keepdims=True))
        lam[b, g] = lq.max(-1) + phi["c"][b, g]
        t = valid[b, g] & (entry >= phi["n_anchor"])
        lk = _exp_linear(k_read[b, g, t], phi["w_k"][hp], phi["b_k"][hp], phi["nc"], scale)
        w = f @ np.exp(lk - phi["c"][b, g]).T  # [G, |T|]
        n_phi[b, g] = f @ phi["s"][b, g] - w @ v_read[b, g, t]
        d_phi[b, g] = f @ phi["z"][b, g] - w.sum(-1)
    if extra is not None:  # alone, the oracle's merge takes it as it is; with phi, two estimates as one
        lam, n_phi, d_phi = extra if phi is None else _combined(lam, n_phi, d_phi, *extra)
    out, rho, lse = merge(scores, v_read, lam, n_phi, d_phi)
    return out.reshape(B, Hq, -1), rho.reshape(B, Hq), lse.reshape(B, Hq)


def _combined(lam_a, n_a, d_a, lam_b, n_b, d_b):
    log_a = np.where(d_a > 0, lam_a + np.log(np.where(d_a > 0, d_a, 1.0)), -np.inf)
    log_b = np.where(d_b > 0, lam_b + np.log(np.where(d_b > 0, d_b, 1.0)), -np.inf)
    top = np.maximum(log_a, log_b)
    lam = np.where(np.isfinite(top), top, 0.0)
    wa = np.where(d_a > 0, np.exp(lam_a - lam), 0.0)
    wb = np.where(d_b > 0, np.exp(lam_b - lam), 0.0)
    return lam, wa[..., None] * n_a + wb[..., None] * n_b, wa * np.maximum(d_a, 0) + wb * np.maximum(d_b, 0)


# ---------------------------------------------------------------- problem generator


def make_problem(B, Hkv, G, N, d, dtype, *, n_sink=4, n_tail=8, K=16, phi=None, m=24, score_max=None, seed=0, pad=3,
                 holes=False, empty_summary=False, extra=False):
    """Random cache, a read set (anchors first, then T), a summary of mid consistent with it, and
    (``extra``) an outside estimate per query head, some of them empty or negative.

    phi: None, "shared" (prf-like, H'=1, norm_coef=1) or "per_head" (learned-like, H'=Hkv)."""
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
    rows, n_read = [], np.zeros((B, Hkv), np.int32)
    for b, g in np.ndindex(B, Hkv):
        kk = min(len(mid), max(0, K - g))  # heads retrieve different counts
        t = np.sort(rng.choice(mid, kk, replace=False)) if kk else np.zeros(0, np.int64)
        ent = np.r_[anchors, t]
        if holes and len(ent) > 2:  # -1 entries inside the valid range are skipped
            ent[rng.choice(len(ent), 2, replace=False)] = -1
        rows.append(ent)
        n_read[b, g] = len(ent)
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
            ph.update(w_q=w * 0.5, w_k=rng.standard_normal((hp, m, d)) * 0.5, b_q=rng.standard_normal((hp, m)), nc=0.0)
        ph["b_k"] = ph["b_q"] if phi == "shared" else rng.standard_normal((hp, m))
        S, z, c = np.zeros((B, Hkv, m, d)), np.zeros((B, Hkv, m)), np.full((B, Hkv), -np.inf)
        for b, g in np.ndindex(B, Hkv):
            if len(mid) == 0 or empty_summary:
                continue
            lk = _exp_linear(k[b, g, mid], ph["w_k"][g if hp > 1 else 0], ph["b_k"][g if hp > 1 else 0], ph["nc"],
                             d**-0.5)
            c[b, g] = lk.max()
            e = np.exp(lk - c[b, g])
            S[b, g], z[b, g] = e.T @ v[b, g, mid], e.sum(0)
        ph.update(s=S, z=z, c=c, n_anchor=len(anchors))
    ext = None
    if extra:  # about as heavy as the exact part; d_phi <= 0 (no estimate) on some heads
        lam = rng.standard_normal((B, Hkv, G)) + np.log(max(len(mid), 1))
        d_phi = rng.uniform(0.2, 2.0, (B, Hkv, G)) * np.where(rng.random((B, Hkv, G)) < 0.25, -1.0, 1.0)
        ext = (lam, rng.standard_normal((B, Hkv, G, d)) * np.abs(d_phi)[..., None], d_phi)
    return (tq, tk, tv), (q, k, v), idx, n_read, ph, ext


def feature_map_inputs(ph, device):
    t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
    return FeatureMapInputs(t(ph["w_q"]), t(ph["b_q"]), t(ph["w_k"]), t(ph["b_k"]), ph["nc"], t(ph["s"]), t(ph["z"]),
                            t(ph["c"]), ph["n_anchor"])


def outside_estimate(ext, device):
    return Estimate.of(*(torch.as_tensor(a, dtype=torch.float32, device=device) for a in ext))


def run_case(B=1, Hkv=2, G=4, N=200, d=64, dtype=torch.float32, phi=None, split=None, idx_dtype=torch.int32,
             n_read_none=False, phi_dot16=True, extra=False, **kw):
    (tq, tk, tv), (q, k, v), idx, n_read, ph, ext = make_problem(B, Hkv, G, N, d, dtype, phi=phi, extra=extra, **kw)
    if n_read_none:
        n_read = np.full_like(n_read, idx.shape[-1])
    ref_out, ref_rho, ref_lse = reference(q, k, v, idx, n_read, d**-0.5, ph, ext)
    dev = DEVICE
    out, rho, lse = fused_decode(
        tq.to(dev), tk.to(dev), tv.to(dev), torch.as_tensor(idx, dtype=idx_dtype, device=dev),
        None if n_read_none else torch.as_tensor(n_read, device=dev), scale=d**-0.5,
        feature_map=None if ph is None else feature_map_inputs(ph, dev),
        estimate=None if ext is None else outside_estimate(ext, dev), split=split, block_n=16, phi_dot16=phi_dot16,
    )
    assert out.dtype == dtype and out.shape == ref_out.shape and rho.shape == lse.shape == ref_rho.shape
    assert rho.dtype == lse.dtype == torch.float32
    out, rho, lse = (x.double().cpu().numpy() for x in (out, rho, lse))
    assert np.isfinite(out).all() and np.isfinite(rho).all() and np.isfinite(lse).all()
    err = np.linalg.norm(out - ref_out) / np.linalg.norm(ref_out)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert err <= tol, f"relative error {err:.2e} > {tol}"
    assert np.abs(rho - ref_rho).max() <= 10 * tol
    # lse: relative to the log-normalizer's size, as a 16-bit score is relative to the score
    assert np.abs(lse - ref_lse).max() <= tol * max(1.0, np.abs(ref_lse).max()), np.abs(lse - ref_lse).max()
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("phi", [None, "shared"])
@pytest.mark.parametrize("split", [None, 16])
def test_outside_estimate_merges_before_the_normalization(dtype, phi, split):
    """An estimate computed outside the kernel (clusters, compact pages) is one more partial state: with
    or without the feature map's, in one program or across splits, out, rho and lse match the oracle."""
    _, ref_rho = run_case(G=4, d=64, dtype=dtype, phi=phi, split=split, N=300, K=40, B=2, extra=True)
    assert ref_rho.max() > 0.1 and ref_rho.min() < ref_rho.max()  # material, and empty on some heads


def test_outside_estimate_alone_is_the_oracle_merge():
    """No feature map: the kernel with ``Estimate.of(lam, n_phi, d_phi)`` is ``merge(scores, v, lam, n_phi, d_phi)``."""
    (tq, tk, tv), (q, k, v), idx, n_read, _, ext = make_problem(1, 2, 3, 150, 32, torch.float32, K=20, extra=True)
    ref = reference(q, k, v, idx, n_read, 32**-0.5, extra=ext)
    for split in (None, 16):
        got = fused_decode(tq.to(DEVICE), tk.to(DEVICE), tv.to(DEVICE), torch.as_tensor(idx, device=DEVICE),
                           torch.as_tensor(n_read, device=DEVICE), scale=32**-0.5, split=split, block_n=16,
                           estimate=outside_estimate(ext, DEVICE))
        for ours, theirs in zip(got, ref):
            np.testing.assert_allclose(ours.double().cpu().numpy(), theirs, rtol=2e-5, atol=2e-5)


def test_lse_is_the_log_normalizer_of_dense_attention():
    """Reading everything (no estimate), lse is logsumexp of the scores, as the oracle's dense step has it."""
    (tq, tk, tv), (q, k, v), _, _, _, _ = make_problem(1, 2, 4, 90, 64, torch.float32)
    idx = torch.arange(90, device=DEVICE).expand(1, 2, 90).contiguous()
    _, rho, lse = fused_decode(tq.to(DEVICE), tk.to(DEVICE), tv.to(DEVICE), idx, split=32, block_n=16)
    s = 64**-0.5 * np.einsum("bhgd,bhnd->bhgn", q.reshape(1, 2, 4, 64), k)
    ref = s.max(-1) + np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1))
    np.testing.assert_allclose(lse.double().cpu().numpy(), ref.reshape(1, 8), rtol=1e-6)
    assert (rho == 0).all()


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
    """Scores up to ~1e3 must not overflow the online softmax, the estimates' offsets or lse."""
    run_case(dtype=dtype, phi=phi, score_max=1e3, split=16, K=30, extra=phi is None)


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
    (tq, tk, tv), (q, k, v), idx, n_read, _, _ = make_problem(1, 2, 4, 100, 64, torch.float32)
    kt, vt = tk.transpose(1, 2).contiguous().transpose(1, 2), tv.transpose(1, 2).contiguous().transpose(1, 2)
    out, _, _ = fused_decode(tq.to(DEVICE), kt.to(DEVICE), vt.to(DEVICE), torch.as_tensor(idx, device=DEVICE),
                             torch.as_tensor(n_read, device=DEVICE), split=16, block_n=16)
    ref, _, _ = reference(q, k, v, idx, n_read, 64**-0.5)
    assert np.linalg.norm(out.double().cpu().numpy() - ref) / np.linalg.norm(ref) <= 1e-4


def test_rejects_bad_shapes():
    q, k = torch.zeros(1, 6, 64), torch.zeros(1, 4, 10, 64)
    with pytest.raises(ValueError):
        fused_decode(q, k, k, torch.zeros(1, 4, 3, dtype=torch.int32))
    q, k, idx = torch.zeros(1, 4, 16), torch.zeros(1, 2, 10, 16), torch.zeros(1, 2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="estimate"):
        fused_decode(q, k, k, idx, estimate=Estimate(torch.zeros(1, 2), torch.zeros(1, 2, 16)))
