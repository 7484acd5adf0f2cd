"""The torch backend's own fitted summaries (SPEC 8) against the identities they must satisfy,
and every estimator at its edges (huge scores, a budget covering mid)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the torch backend cannot run")

import topkphi  # noqa: E402
from tests.backends.test_torch_backend import (  # noqa: E402
    BACKEND,
    ORACLE,
    as64,
    as_numpy_queries,
    queries_of,
    summary_to_numpy,
    summary_to_torch,
    to_torch,
)
from tests.cases import random_case, rel_err  # noqa: E402
from topkphi.backends import numpy_fit, torch_pages  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(before, 2))
    yield
    torch.set_num_threads(before)


def metric_cost(keys, centroids, metric) -> float:
    """The k-means objective under the query metric: sum of each key's distance to its nearest centroid."""
    diff = keys[:, None] - centroids[None]
    return float(np.einsum("ncd,de,nce->nc", diff, metric, diff).min(axis=1).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cluster_fit_statistics_follow_its_own_labels(dtype):
    case = random_case(3, n_tokens=300, n_kv=2, group=2, feature_map="cluster", n_clusters=8, batch=2)
    cfg = case.cfg
    q, k, v = to_torch(case, dtype)
    queries = queries_of(case, dtype)
    st = BACKEND.build_summary(k, v, cfg, queries).estimate
    assert st.labels.dtype == torch.int32 and st.count.dtype == st.beta.dtype == torch.float32
    ref = ORACLE.build_summary(as64(k), as64(v), cfg, as_numpy_queries(queries)).estimate
    lo, hi = cfg.n_sink, 300 - cfg.n_tail
    k64, v64, tau = as64(k), as64(v), cfg.tau(k.shape[-1])
    labels = st.labels.numpy().astype(np.int64)
    group, window = 2, case.ref_q.shape[2]
    positions = np.tile(np.arange(300 - window, 300), group)
    for b in range(2):
        for g in range(2):
            own = labels[b, g, lo:hi]
            assert own.min() >= 0 and own.max() < 8 and np.all(labels[b, g, :lo] == -1)
            onehot = np.eye(8)[own]
            np.testing.assert_allclose(as64(st.count[b, g]), onehot.sum(0))
            np.testing.assert_allclose(as64(st.ksum[b, g]), onehot.T @ k64[b, g, lo:hi], rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(as64(st.vsum[b, g]), onehot.T @ v64[b, g, lo:hi], rtol=1e-5, atol=1e-4)
            # the metric is the oracle's; every key sits with its nearest centroid under it
            np.testing.assert_allclose(as64(st.metric[b, g]), ref.metric[b, g], rtol=1e-5, atol=1e-6)
            centroids, metric = as64(st.centroids[b, g]), ref.metric[b, g]
            again = numpy_fit.metric_labels(k64[b, g, lo:hi], centroids, metric)
            assert np.mean(again != own) < 0.01  # fp32 distances may flip a near-tie, no more
            # beta is the oracle's fit of these labels; the k-means is as good as the oracle's
            rows = as64(queries.q)[b, g * group:(g + 1) * group].reshape(group * window, -1)
            beta = numpy_fit.fit_beta(rows, positions, k64[b, g], onehot, lo, hi, cfg.n_sink, cfg.n_tail,
                                      cfg.top_k, tau)
            np.testing.assert_allclose(as64(st.beta[b, g]), beta, atol=2e-4)
            assert np.abs(beta).max() > 1e-2  # a fit that says something
            own_cost = metric_cost(k64[b, g, lo:hi], centroids, metric)
            assert own_cost <= 1.1 * metric_cost(k64[b, g, lo:hi], ref.centroids[b, g], metric)


def test_cluster_estimate_is_as_good_as_the_oracles():
    """The torch fit decodes as accurately as the oracle's fit (different k-means draws)."""
    errors = {"torch": [], "oracle": []}
    for seed in range(3):
        case = random_case(seed + 20, n_tokens=600, group=4, top_k=32, feature_map="cluster", n_clusters=16, d=32)
        q, k, v = to_torch(case, torch.float32)
        out, _ = BACKEND.decode(q, k, v, BACKEND.build_summary(k, v, case.cfg, queries_of(case, torch.float32)),
                                case.cfg)
        ref, _ = ORACLE.decode(case.q, case.k, case.v, ORACLE.build_summary(case.k, case.v, case.cfg,
                                                                            case.queries()), case.cfg)
        dense = ORACLE.dense(case.q, case.k, case.v)
        errors["torch"].append(rel_err(as64(out), dense))
        errors["oracle"].append(rel_err(ref, dense))
    assert np.mean(errors["torch"]) <= 1.2 * np.mean(errors["oracle"])


@pytest.mark.parametrize("n0", [23, 200])  # 3 mid tokens (clusters seeded as tokens arrive), and 180
def test_cluster_fold_in_matches_the_oracle(n0):
    """The oracle's fit at n0, then the same appends in both: labels, sums and seeded centroids agree."""
    case = random_case(4, n_tokens=400, group=2, feature_map="cluster", n_clusters=8)
    cfg = case.cfg
    queries = topkphi.ReferenceQueries(case.ref_q, end=n0)
    ref = ORACLE.build_summary(case.k[:, :, :n0], case.v[:, :, :n0], cfg, queries=queries)
    q, k, v = to_torch(case, torch.float32)
    summary = summary_to_torch(ref, k)
    for n in (n0 + 1, n0 + 2, n0 + 9, n0 + 30, 400):
        ref = ORACLE.append(ref, case.k[:, :, :n], case.v[:, :, :n], cfg)
        summary = BACKEND.append(summary, k[:, :, :n], v[:, :, :n], cfg)
        st, rs = summary.estimate, ref.estimate
        np.testing.assert_array_equal(st.labels.numpy(), rs.labels)
        np.testing.assert_allclose(as64(st.count), rs.count)
        np.testing.assert_allclose(as64(st.ksum), rs.ksum, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(as64(st.vsum), rs.vsum, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(as64(st.centroids), rs.centroids, rtol=1e-6, atol=1e-6)
    out, stats = BACKEND.decode(q, k, v, summary, cfg)
    ref_out, _ = ORACLE.decode(case.q, case.k, case.v, ref, cfg, selected=stats.selected.numpy())
    assert rel_err(as64(out), ref_out) <= 1e-4


def test_cluster_prefill_then_appends_equals_fresh_assignment():
    """The torch fit at N0, then appends: new tokens take the frozen centroids' labels, the sums are
    those of all labels, and single-token appends write the labels in place."""
    case = random_case(5, n_tokens=400, n_kv=2, group=2, feature_map="cluster", n_clusters=8)
    cfg = case.cfg
    q, k, v = to_torch(case, torch.float32)
    summary = BACKEND.build_summary(k[:, :, :200], v[:, :, :200], cfg, queries_of(case, torch.float32, end=200))
    fitted = summary.estimate.centroids.clone()
    ptr = summary.estimate.labels.data_ptr()
    for n in range(201, 206):
        summary = BACKEND.append(summary, k[:, :, :n], v[:, :, :n], cfg)
    assert summary.estimate.labels.data_ptr() == ptr
    summary = BACKEND.append(summary, k, v, cfg)
    st = summary.estimate
    assert torch.equal(st.centroids, fitted)  # frozen once C are seeded
    lo, hi, old_end = cfg.n_sink, 400 - cfg.n_tail, 200 - cfg.n_tail
    labels = st.labels.numpy().astype(np.int64)
    k64, v64 = as64(k), as64(v)
    for g in range(2):
        new = numpy_fit.metric_labels(k64[0, g, old_end:hi], as64(fitted[0, g]), as64(st.metric[0, g]))
        np.testing.assert_array_equal(labels[0, g, old_end:hi], new)
        onehot = np.eye(8)[labels[0, g, lo:hi]]
        np.testing.assert_allclose(as64(st.count[0, g]), onehot.sum(0))
        np.testing.assert_allclose(as64(st.ksum[0, g]), onehot.T @ k64[0, g, lo:hi], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(as64(st.vsum[0, g]), onehot.T @ v64[0, g, lo:hi], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_fit_equals_the_oracles(dtype):
    case = random_case(7, n_tokens=333, n_kv=2, group=3, selection="compact", feature_map="compact", page_size=7,
                       n_sink=5, batch=2)
    q, k, v = to_torch(case, dtype)
    queries = queries_of(case, dtype)
    pages = BACKEND.build_summary(k, v, case.cfg, queries).pages
    ref = ORACLE.build_summary(as64(k), as64(v), case.cfg, as_numpy_queries(queries)).pages
    assert pages.first_complete == ref.first_complete and pages.kappa.shape == ref.kappa.shape
    for name in ("kappa", "beta", "nu", "mass"):
        np.testing.assert_allclose(as64(getattr(pages, name)), getattr(ref, name), rtol=1e-4, atol=1e-5)


def test_compact_prefill_decodes_and_appends_equal_a_fresh_fit():
    """Prefill at N0, then decode steps (tail mass) between appends: every page equals a fresh fit
    of the final mass, and the oracle fed the same steps holds the same pages."""
    case = random_case(8, n_tokens=300, n_kv=2, group=2, selection="compact", feature_map="compact", page_size=7,
                       top_k=28)
    cfg = case.cfg
    q, k, v = to_torch(case, torch.float32)
    summary = BACKEND.build_summary(k[:, :, :120], v[:, :, :120], cfg, queries_of(case, torch.float32, end=120))
    ref = ORACLE.build_summary(case.k[:, :, :120], case.v[:, :, :120], cfg, topkphi.ReferenceQueries(case.ref_q, 120))
    n = 120
    for step in (1, 1, 5, 7, 13, 1, 60, 92):
        n += step
        summary = BACKEND.append(summary, k[:, :, :n], v[:, :, :n], cfg)
        ref = ORACLE.append(ref, case.k[:, :, :n], case.v[:, :, :n], cfg)
        _, stats = BACKEND.decode(q, k[:, :, :n], v[:, :, :n], summary, cfg)
        ORACLE.decode(case.q, case.k[:, :, :n], case.v[:, :, :n], ref, cfg, selected=stats.selected.numpy())
    assert n == 300
    dims = topkphi.Dims(1, 4, 2, 300, k.shape[-1], v.shape[-1])
    fresh = torch_pages.empty_pages(cfg, dims, k)
    fresh.mass[:] = summary.pages.mass  # the mass the appends fitted from, refitted at once
    fresh = torch_pages.fold_pages(fresh, cfg.n_sink, k, v, cfg.n_sink, summary.mid_end, cfg)
    for name in ("kappa", "beta", "nu"):
        torch.testing.assert_close(getattr(summary.pages, name), getattr(fresh, name), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(as64(getattr(summary.pages, name)), getattr(ref.pages, name), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(as64(summary.pages.mass), ref.pages.mass, rtol=1e-4, atol=1e-6)


def test_compact_read_set_takes_whole_pages_and_both_fragments():
    case = random_case(9, n_tokens=203, n_kv=2, group=2, selection="compact", feature_map="compact", page_size=8,
                       n_sink=5, n_tail=9, top_k=24)
    q, k, v = to_torch(case, torch.float32)
    _, stats = BACKEND.decode(q, k, v, BACKEND.build_summary(k, v, case.cfg, queries_of(case, torch.float32)),
                              case.cfg)
    mid_start, mid_end = 5, 203 - 9  # complete pages 1 .. 23, fragments [5, 8) and [192, 194)
    for g in range(2):
        chosen = stats.selected[0, g].numpy()
        assert np.all(np.diff(chosen) > 0) and np.isin([5, 6, 7, 192, 193], chosen).all()
        pages = np.unique(chosen[(chosen >= 8) & (chosen < 192)] // 8)
        assert len(pages) == 3 and all(np.isin(np.arange(p * 8, p * 8 + 8), chosen).all() for p in pages)
        assert chosen.size == 3 + 3 * 8 + 2 and chosen.min() >= mid_start and chosen.max() < mid_end


ESTIMATORS = [dict(feature_map="prf"), dict(feature_map="taylor2", d=16), dict(feature_map="learned"),
              dict(feature_map=None), dict(feature_map="cluster"), dict(feature_map="cluster", selection="page"),
              dict(selection="compact", feature_map="compact"), dict(selection="compact", feature_map="cluster"),
              dict(feature_map="prf", selection="page"), dict(selection="compact", feature_map=None)]


@pytest.mark.parametrize("fields", ESTIMATORS, ids=lambda f: "-".join(map(str, f.values())))
def test_no_nan_or_inf_at_huge_scores(fields):
    case = random_case(10, n_tokens=300, group=2, page_size=8, **fields)
    tau = case.cfg.tau(case.k.shape[-1])
    peak = np.abs(tau * np.einsum("bhgd,bhnd->bhgn", case.q.reshape(1, 2, 2, -1), case.k)).max()
    case.q *= 1e4 / peak  # the largest |score| reaches 1e4, for the decode query and the fit's rows
    case.ref_q *= 1e4 / peak
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = to_torch(case, dtype)
        queries = queries_of(case, dtype) if case.cfg.fitted else None
        summary = BACKEND.build_summary(k, v, case.cfg, queries)
        out, stats = BACKEND.decode(q, k, v, summary, case.cfg)
        assert torch.isfinite(out).all() and torch.isfinite(stats.lse).all()
        assert ((stats.rho >= 0) & (stats.rho <= 1)).all()
        ref, ref_stats = ORACLE.decode(as64(q), as64(k), as64(v), summary_to_numpy(summary), case.cfg,
                                       selected=stats.selected.numpy())
        np.testing.assert_allclose(stats.lse.numpy(), ref_stats.lse, rtol=1e-5)


@pytest.mark.parametrize("fields", ESTIMATORS, ids=lambda f: "-".join(map(str, f.values())))
def test_budget_covering_mid_is_dense(fields):
    case = random_case(11, n_tokens=150, group=3, top_k=150, page_size=8, **fields)
    q, k, v = to_torch(case, torch.float32)
    queries = queries_of(case, torch.float32) if case.cfg.fitted else None
    out, stats = BACKEND.decode(q, k, v, BACKEND.build_summary(k, v, case.cfg, queries), case.cfg)
    assert rel_err(as64(out), ORACLE.dense(case.q, case.k, case.v)) < 1e-5
    assert torch.all(stats.rho == 0) and torch.all(stats.tokens_read == 150)
    tau = case.cfg.tau(case.k.shape[-1])
    s = tau * np.einsum("bhgd,bhnd->bhgn", case.q.reshape(1, 2, 3, -1), case.k).reshape(1, 6, -1)
    lse = s.max(-1) + np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1))
    np.testing.assert_allclose(stats.lse.numpy(), lse, rtol=1e-6)
