"""The MLX backend against the float64 oracle: parity matrix, read sets, streaming, stats, errors, path choice.

The fit itself (clusters, compact pages) is tested in ``test_mlx_fit.py``, the Metal launcher
and kernel source in ``test_mlx_metal.py``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'mlx[cpu]' on Linux)")

import topkphi  # noqa: E402
from tests.cases import PARITY_MATRIX, random_case, rel_err  # noqa: E402
from topkphi.backends import mlx_backend, mlx_metal  # noqa: E402
from topkphi.backends.mlx_backend import to_mlx_summary  # noqa: E402
from topkphi.regions import Regions  # noqa: E402

ORACLE = topkphi.get_backend("numpy")
MLX = topkphi.get_backend("mlx")
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
TOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 2e-2}
CASES = {name: kw for name, kw in PARITY_MATRIX}
METAL_DEFAULT = mx.metal.is_available() and mx.default_device() == mx.gpu


def to_mlx(case, dtype: str):
    """``(case rounded as the backend sees it, q, k, v as MLX arrays of dtype)``; ``ref_q`` rounds too."""
    arrays = [mx.array(getattr(case, n).astype(np.float32)).astype(DTYPES[dtype]) for n in ("q", "k", "v", "ref_q")]
    rounded = [np.array(a.astype(mx.float32)).astype(np.float64) for a in arrays]  # bf16 rounds through mlx
    return replace(case, q=rounded[0], k=rounded[1], v=rounded[2], ref_q=rounded[3]), *arrays[:3]


def case_of(name: str, seed: int = 0, **changes):
    return random_case(seed + list(CASES).index(name), **{**CASES[name], **changes})


def oracle_summary(case):
    return ORACLE.build_summary(case.k, case.v, case.cfg, queries=case.queries() if case.cfg.fitted else None)


def mlx_summary(case, k, v):
    """The summary MLX decodes in the parity matrix: its own, or the oracle's fit converted (SPEC 8:
    k-means draws differ between the two RNGs, so fitted rows decode the same fit)."""
    if case.cfg.fitted:
        return to_mlx_summary(oracle_summary(case))
    return MLX.build_summary(k, v, case.cfg)


def decode_both(case, q, k, v):
    """MLX's decode and the oracle's on MLX's own ``T`` (near-ties may order differently in low precision)."""
    out, stats = MLX.decode(q, k, v, mlx_summary(case, k, v), case.cfg)
    ref, ref_stats = ORACLE.decode(case.q, case.k, case.v, oracle_summary(case), case.cfg,
                                   selected=np.array(stats.selected))
    return out, stats, ref, ref_stats


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_oracle(name, dtype):
    case, q, k, v = to_mlx(case_of(name), dtype)
    out, stats, ref, ref_stats = decode_both(case, q, k, v)
    assert out.dtype == q.dtype and out.shape == q.shape[:2] + v.shape[3:]
    out = np.array(out.astype(mx.float32))
    assert np.all(np.isfinite(out))
    assert rel_err(out, ref) <= TOL[dtype]
    assert stats.rho.dtype == stats.lse.dtype == mx.float32
    np.testing.assert_allclose(np.array(stats.rho), ref_stats.rho, atol=TOL[dtype])
    np.testing.assert_allclose(np.array(stats.lse), ref_stats.lse, rtol=TOL[dtype], atol=TOL[dtype])
    np.testing.assert_array_equal(np.array(stats.n_selected), ref_stats.n_selected)
    np.testing.assert_array_equal(np.array(stats.tokens_read), ref_stats.tokens_read)
    np.testing.assert_allclose(np.array(stats.token_equivalents), ref_stats.token_equivalents, rtol=1e-6)
    assert stats.n_tokens == ref_stats.n_tokens


def test_lse_is_the_log_normalizer_of_a_covering_step():
    case, q, k, v = to_mlx(case_of("k-covers-mid"), "float32")
    _, stats = MLX.decode(q, k, v, MLX.build_summary(k, v, case.cfg), case.cfg)
    batch, n_kv, _, d = case.k.shape
    s = np.einsum("bhgd,bhnd->bhgn", case.q.reshape(batch, n_kv, -1, d), case.k) * case.cfg.tau(d)
    top = s.max(-1)
    lse = top + np.log(np.exp(s - top[..., None]).sum(-1))
    np.testing.assert_allclose(np.array(stats.lse), lse.reshape(batch, -1), rtol=1e-6)


def _margin(case, summary) -> float:
    """Gap between the last kept and the first dropped selection score, relative, in float64."""
    cfg, regions = case.cfg, Regions.of(case.k.shape[2], case.cfg.n_sink, case.cfg.n_tail)
    batch, n_kv, _, d = case.k.shape
    q_g, tau = case.q.reshape(batch, n_kv, -1, d), cfg.tau(d)
    pages = summary.pages
    if cfg.selection == "exact":
        score = np.einsum("bhgd,bhnd->bhgn", q_g, case.k[:, :, regions.mid_start: regions.mid_end])
        n_take = min(cfg.top_k, regions.n_mid)
    elif cfg.selection == "page":
        score = (np.einsum("bhgd,bhpd->bhgp", np.maximum(q_g, 0), pages.kmax)
                 + np.einsum("bhgd,bhpd->bhgp", np.minimum(q_g, 0), pages.kmin))
        n_take = min(max(1, cfg.top_k // cfg.page_size), summary.n_pages)
    else:
        score = tau * np.einsum("bhgd,bhpd->bhgp", q_g, pages.kappa) + pages.beta[:, :, None]
        n_take = min(max(1, cfg.top_k // cfg.page_size), summary.n_pages)
    score = score.max(2)
    if n_take >= score.shape[-1]:
        return np.inf
    ranked = -np.sort(-score, axis=-1)
    return float(np.min((ranked[..., n_take - 1] - ranked[..., n_take]) / np.abs(ranked).max()))


@pytest.mark.parametrize("name", [n for n in CASES if n != "tiny-all-anchors"])
def test_read_set_equals_oracle_on_separated_scores(name):
    case, q, k, v = to_mlx(case_of(name), "float32")
    summary = oracle_summary(case)
    if _margin(case, summary) < 1e-5:
        pytest.skip("scores at the cut are too close to compare selections across precisions")
    plan = topkphi.plan_step(case.cfg, summary, case.k.shape[2], case.k.shape[3], case.v.shape[3])
    tau = case.cfg.tau(case.k.shape[3])
    ours = MLX.read_set(q, k, mlx_summary(case, k, v), plan, case.cfg, tau)
    ref = ORACLE.read_set(case.q, case.k, summary, plan, case.cfg, tau)
    assert ours.n_anchor == ref.n_anchor
    np.testing.assert_array_equal(np.array(ours.n_selected), ref.n_selected)
    idx, want = np.array(ours.idx), ref.idx
    assert idx.dtype == np.int32
    np.testing.assert_array_equal(idx[..., : ours.n_anchor], want[..., : ref.n_anchor])  # sink, then tail
    for b, g in np.ndindex(idx.shape[:2]):
        t, n = idx[b, g, ours.n_anchor:], int(ours.n_selected[b, g].item())
        np.testing.assert_array_equal(t[:n], want[b, g, ref.n_anchor: ref.n_anchor + n])
        assert np.all(np.diff(t[:n]) > 0) and np.all(t[n:] == -1)  # T ascending, then -1 padding


def test_anchors_come_first_sink_then_tail():
    case, q, k, v = to_mlx(case_of("batch2-page-small-pages"), "float32")
    summary = MLX.build_summary(k, v, case.cfg)
    n, d = case.k.shape[2:]
    plan = topkphi.plan_step(case.cfg, summary, n, d, d)
    reads = MLX.read_set(q, k, summary, plan, case.cfg, case.cfg.tau(d))
    r = plan.regions
    anchors = np.concatenate([np.arange(r.sink_end), np.arange(r.mid_end, n)])
    assert reads.n_anchor == anchors.size
    assert np.all(np.array(reads.idx)[..., : anchors.size] == anchors)
    _, stats = MLX.decode(q, k, v, summary, case.cfg)
    np.testing.assert_array_equal(np.array(stats.selected), np.array(reads.selected))


def test_ties_go_to_the_smaller_index():
    case = random_case(5, n_tokens=120, n_kv=1, group=2, d=32, top_k=5, feature_map=None)
    direction = case.q.mean(axis=1) / np.linalg.norm(case.q.mean(axis=1))
    case.k[:, :, 40:60] = 20.0 * direction[:, None, None]  # 20 identical top keys, 5 kept
    case, q, k, v = to_mlx(case, "float32")
    _, stats = MLX.decode(q, k, v, MLX.build_summary(k, v, case.cfg), case.cfg)
    np.testing.assert_array_equal(np.array(stats.selected)[0, 0], np.arange(40, 45))
    _, ref = ORACLE.decode(case.q, case.k, case.v, ORACLE.build_summary(case.k, case.v, case.cfg), case.cfg)
    np.testing.assert_array_equal(ref.selected[0, 0], np.arange(40, 45))


@pytest.mark.parametrize("selection", ["exact", "page"])
@pytest.mark.parametrize("feature_map", ["prf", "learned", "taylor2"])
def test_prefill_then_appends_equals_fresh_build(selection, feature_map):
    n0, n_final = 8, 140  # the prefill's mid is still empty
    case = random_case(7, n_tokens=n_final, d=16, selection=selection, page_size=6, feature_map=feature_map,
                       n_sink=3, n_tail=9, top_k=12)
    _, _, k, v = to_mlx(case, "float32")
    summary = MLX.build_summary(k[:, :, :n0], v[:, :, :n0], case.cfg)
    n = n0
    for step in (1, 1, 5, 1, 30, 1, 7, 58, 28):  # single tokens and chunks, crossing page edges
        n += step
        summary = MLX.append(summary, k[:, :, :n], v[:, :, :n], case.cfg)
    assert n == n_final
    fresh = MLX.build_summary(k, v, case.cfg)
    assert (summary.n_tokens, summary.mid_end, summary.n_pages) == (fresh.n_tokens, fresh.mid_end, fresh.n_pages)
    ours, new = summary.estimate, fresh.estimate
    for field in ("s", "z"):  # float32 sums in another order
        assert rel_err(np.array(getattr(ours, field)), np.array(getattr(new, field))) < 1e-5, field
    np.testing.assert_allclose(np.array(ours.c_max), np.array(new.c_max), rtol=1e-6, atol=1e-6)
    if selection == "page":  # minima and maxima of the stored keys: exact
        np.testing.assert_array_equal(np.array(summary.pages.kmin), np.array(fresh.pages.kmin))
        np.testing.assert_array_equal(np.array(summary.pages.kmax), np.array(fresh.pages.kmax))
    ref = ORACLE.build_summary(case.k.astype(np.float32).astype(np.float64), case.v, case.cfg)
    np.testing.assert_allclose(np.array(new.c_max), ref.estimate.c_max, rtol=1e-5)
    assert rel_err(np.array(new.s), ref.estimate.s) < 1e-4


@pytest.mark.parametrize("name", ["mha-exact-prf", "gqa8-page-learned", "gqa3-exact-cluster", "gqa4-compact-compact",
                                  "gqa2-compact-cluster", "topk-only-page"])
def test_no_nan_or_inf_at_huge_scores(name):
    """|s| ~ 1e4: every exponent is taken against a running max; the own fit runs at that scale too."""
    case, q, k, v = to_mlx(case_of(name, score_scale=1e4), "float32")
    own = MLX.build_summary(k, v, case.cfg, queries=case.queries(mx.array) if case.cfg.fitted else None)
    for summary in (own, mlx_summary(case, k, v)):
        out, stats = MLX.decode(q, k, v, summary, case.cfg)
        for x in (out, stats.rho, stats.lse):
            assert np.all(np.isfinite(np.array(x)))
    out, stats, ref, ref_stats = decode_both(case, q, k, v)
    assert rel_err(np.array(out), ref) <= 1e-3  # scores ~1e4 carry float32's 1e-3 absolute rounding
    np.testing.assert_allclose(np.array(stats.lse), ref_stats.lse, rtol=1e-5)


def test_taylor2_parity():
    case, q, k, v = to_mlx(random_case(11, n_tokens=230, group=3, d=16, feature_map="taylor2"), "bfloat16")
    out, stats, ref, ref_stats = decode_both(case, q, k, v)
    assert rel_err(np.array(out.astype(mx.float32)), ref) <= TOL["bfloat16"]
    np.testing.assert_allclose(np.array(stats.rho), ref_stats.rho, atol=TOL["bfloat16"])


def test_dense_and_covering_budget():
    case, q, k, v = to_mlx(case_of("k-covers-mid"), "float32")
    out, stats = MLX.decode(q, k, v, MLX.build_summary(k, v, case.cfg), case.cfg)
    dense = np.array(MLX.dense(q, k, v))
    assert rel_err(dense, ORACLE.dense(case.q, case.k, case.v)) < 1e-5
    assert rel_err(np.array(out), dense) < 1e-5
    assert np.all(np.array(stats.rho) == 0) and np.all(np.array(stats.tokens_read) == case.k.shape[2])


def test_numpy_inputs_become_float32():
    case = case_of("gqa3-exact-prf")
    summary = MLX.build_summary(case.k, case.v, case.cfg)
    out, _ = MLX.decode(case.q, case.k, case.v, summary, case.cfg)
    assert out.dtype == mx.float32 and summary.estimate.s.dtype == mx.float32


def test_bad_inputs_raise():
    case, q, k, v = to_mlx(case_of("gqa3-exact-prf"), "float32")
    summary = MLX.build_summary(k, v, case.cfg)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        MLX.decode(q[:, :5], k, v, summary, case.cfg)
    with pytest.raises(ValueError, match=r"q must be \[B, Hq, d\]"):
        MLX.decode(q[..., :8], k, v, summary, case.cfg)
    with pytest.raises(ValueError, match="does not match k"):
        MLX.build_summary(k, v[:, :, :10], case.cfg)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        MLX.decode(q.astype(mx.int32), k, v, summary, case.cfg)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        MLX.decode(np.zeros((1, 6, 64), np.int64), k, v, summary, case.cfg)
    with pytest.raises(ValueError, match="call append"):
        MLX.decode(q, k[:, :, :-1], v[:, :, :-1], summary, case.cfg)
    with pytest.raises(ValueError, match="shrank"):
        MLX.append(summary, k[:, :, :-2], v[:, :, :-2], case.cfg)
    with pytest.raises(ValueError, match="page metadata"):
        MLX.decode(q, k, v, summary, replace(case.cfg, selection="page"))
    with pytest.raises(ValueError, match="no feature_map state"):
        MLX.decode(q, k, v, MLX.build_summary(k, v, replace(case.cfg, feature_map=None)), case.cfg)
    with pytest.raises(ValueError, match="n_sink"):
        MLX.decode(q, k, v, summary, replace(case.cfg, n_sink=2))
    with pytest.raises(ValueError, match="reference queries"):
        MLX.build_summary(k, v, replace(case.cfg, feature_map="cluster"))
    with pytest.raises(NotImplementedError, match="does not take a given selection"):
        MLX.decode(q, k, v, summary, case.cfg, selected=np.zeros((1, 2, 3), np.int64))


def test_path_choice_is_pure_mlx_here(monkeypatch):
    ops = MLX.estimator_ops(topkphi.Config(selection="exact", feature_map="prf", n_features=16))
    prf = ops.params(topkphi.Config(selection="exact", feature_map="prf", n_features=16), 64, 2)
    taylor = ops.params(topkphi.Config(selection="exact", feature_map="taylor2"), 64, 2)
    q, k = mx.zeros((1, 4, 64)), mx.zeros((1, 2, 30, 64))
    assert mlx_backend.use_metal(q, k, k, prf) == METAL_DEFAULT
    assert mlx_backend.use_metal(q, k, k, None) == METAL_DEFAULT  # exact reads only; estimates merge after
    assert not mlx_backend.use_metal(q, k, k, taylor)  # the kernel completes exp-linear maps only
    if METAL_DEFAULT:
        return
    monkeypatch.setattr(mlx_metal, "metal_attend", lambda *a, **kw: pytest.fail("the Metal kernel was reached"))
    for name in ("gqa4-page-prf", "gqa2-compact-cluster", "gqa4-compact-compact"):
        case, q, k, v = to_mlx(case_of(name), "bfloat16")
        mx.eval(MLX.decode(q, k, v, mlx_summary(case, k, v), case.cfg)[0])
