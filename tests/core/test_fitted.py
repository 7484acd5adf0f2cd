"""The oracle's fitted summaries (SPEC 8) against their own identities."""

from __future__ import annotations

import numpy as np
import pytest

import topkphi
from tests.cases import random_case, rel_err
from topkphi.backends import numpy_fit
from topkphi.summary import ClusterState, CompactPages, complete_pages

ORACLE = topkphi.get_backend("numpy")


def run(case, cfg=None):
    cfg = cfg or case.cfg
    summary = ORACLE.build_summary(case.k, case.v, cfg, queries=case.queries())
    return summary, *ORACLE.decode(case.q, case.k, case.v, summary, cfg)


FITTED = [dict(feature_map="cluster"), dict(selection="compact", feature_map="compact"),
          dict(selection="compact", feature_map="cluster"), dict(selection="compact", feature_map=None)]


@pytest.mark.parametrize("fields", FITTED)
def test_budget_covering_mid_is_dense(fields):
    case = random_case(1, n_tokens=150, group=3, top_k=150, page_size=8, **fields)
    _, out, stats = run(case)
    assert rel_err(out, ORACLE.dense(case.q, case.k, case.v)) < 1e-12
    assert np.all(stats.rho == 0) and np.all(stats.tokens_read == 150)


def test_one_cluster_per_token_is_exact():
    # singletons: mu'_c is the key itself and the fitted beta is 0 (t_c = e_c for every row), so
    # the estimate of the unread part is exact attention over it
    case = random_case(2, n_tokens=120, group=2, top_k=10, feature_map="cluster", n_clusters=100)
    summary, out, stats = run(case)
    assert np.allclose(summary.estimate.beta, 0, atol=1e-12)
    assert rel_err(out, ORACLE.dense(case.q, case.k, case.v)) < 1e-10
    assert np.all(stats.rho > 0)


def test_fewer_clusters_estimate_better_than_top_k_alone():
    errors = {}
    for name, fmap in (("cluster", "cluster"), ("topk", None)):
        errs = []
        for seed in range(6):
            case = random_case(seed, n_tokens=600, group=4, top_k=32, feature_map=fmap, n_clusters=16, d=32)
            errs.append(rel_err(run(case)[1], ORACLE.dense(case.q, case.k, case.v)))
        errors[name] = np.mean(errs)
    assert errors["cluster"] < 0.5 * errors["topk"]


def test_cluster_statistics_are_sums_over_labels():
    case = random_case(3, n_tokens=300, n_kv=2, group=2, feature_map="cluster", n_clusters=8)
    summary = ORACLE.build_summary(case.k, case.v, case.cfg, queries=case.queries())
    st: ClusterState = summary.estimate
    lo, hi = summary.mid_start, summary.mid_end
    for b in range(1):
        for g in range(2):
            labels = st.labels[b, g, lo:hi]
            assert labels.min() >= 0 and np.all(st.labels[b, g, :lo] == -1)
            onehot = np.eye(8)[labels]
            np.testing.assert_allclose(st.count[b, g], onehot.sum(0))
            np.testing.assert_allclose(st.ksum[b, g], onehot.T @ case.k[b, g, lo:hi], atol=1e-10)
            np.testing.assert_allclose(st.vsum[b, g], onehot.T @ case.v[b, g, lo:hi], atol=1e-10)
            # every key sits with its nearest centroid under the query metric
            again = numpy_fit.metric_labels(case.k[b, g, lo:hi], st.centroids[b, g], st.metric[b, g])
            assert np.array_equal(again, labels)


def test_cluster_fold_in_matches_labels_of_the_frozen_centroids():
    case = random_case(4, n_tokens=400, group=2, feature_map="cluster", n_clusters=8)
    cfg = case.cfg
    queries = topkphi.ReferenceQueries(case.ref_q, end=200)
    summary = ORACLE.build_summary(case.k[:, :, :200], case.v[:, :, :200], cfg, queries=queries)
    fitted = summary.estimate.centroids.copy()
    for n in (201, 230, 231, 400):
        summary = ORACLE.append(summary, case.k[:, :, :n], case.v[:, :, :n], cfg)
    st = summary.estimate
    assert np.array_equal(st.centroids, fitted)  # fold-in never moves a centroid once C are seeded
    lo, hi = summary.mid_start, summary.mid_end
    for g in range(case.k.shape[1]):
        labels = st.labels[0, g, lo:hi]
        onehot = np.eye(8)[labels]
        np.testing.assert_allclose(st.count[0, g], onehot.sum(0))
        np.testing.assert_allclose(st.vsum[0, g], onehot.T @ case.v[0, g, lo:hi], atol=1e-10)
        new = labels[200 - 16 - lo:]
        assert np.array_equal(new, numpy_fit.metric_labels(case.k[0, g, 200 - 16:hi], fitted[0, g], st.metric[0, g]))


def test_short_prompt_seeds_clusters_as_tokens_arrive():
    case = random_case(5, n_tokens=80, n_kv=1, group=2, feature_map="cluster", n_clusters=8, n_sink=4, n_tail=16)
    queries = topkphi.ReferenceQueries(case.ref_q, end=23)
    summary = ORACLE.build_summary(case.k[:, :, :23], case.v[:, :, :23], case.cfg, queries=queries)
    assert summary.estimate.count.sum() == 3  # 3 mid tokens: 3 clusters of one
    summary = ORACLE.append(summary, case.k, case.v, case.cfg)
    count = summary.estimate.count[0, 0]
    assert count.sum() == 80 - 20 and np.all(count > 0)
    out, _ = ORACLE.decode(case.q, case.k, case.v, summary, case.cfg)
    assert np.isfinite(out).all()


def test_identical_keys_give_log_page_size_and_the_mean_value():
    rng = np.random.default_rng(6)
    keys = np.tile(rng.standard_normal(8), (16, 1))
    values = rng.standard_normal((16, 8))
    for mass in (np.full(16, 0.3), np.zeros(16)):  # equal mass, and the no-mass fallback
        kappa, beta, nu = numpy_fit.fit_compact_page(keys, values, mass)
        np.testing.assert_allclose(kappa, keys[0])
        assert beta == pytest.approx(np.log(16))
        np.testing.assert_allclose(nu, values.mean(axis=0), atol=1e-12)


def test_compact_token_reproduces_a_single_reference_querys_page_mass():
    case = random_case(7, n_tokens=200, n_kv=1, group=1, selection="compact", feature_map="compact", page_size=8)
    cfg = case.cfg
    q_ref = case.ref_q[:, :, -1:]  # one row at the last position: a_j is its softmax
    summary = ORACLE.build_summary(case.k, case.v, cfg, queries=topkphi.ReferenceQueries(q_ref, end=200))
    pages: CompactPages = summary.pages
    tau = cfg.tau(case.k.shape[-1])
    first, n_pages = complete_pages(summary.mid_start, summary.mid_end, 8)
    for i in range(n_pages):
        p = first + i
        s = tau * case.k[0, 0, p * 8:(p + 1) * 8] @ q_ref[0, 0, 0]
        logit = tau * pages.kappa[0, 0, i] @ q_ref[0, 0, 0] + pages.beta[0, 0, i]
        assert logit == pytest.approx(np.log(np.exp(s).sum()), rel=1e-12)


def test_compact_prefill_then_appends_equals_fresh_build():
    case = random_case(8, n_tokens=300, n_kv=2, group=2, selection="compact", feature_map="compact", page_size=7)
    cfg, queries = case.cfg, topkphi.ReferenceQueries(case.ref_q, end=120)
    summary = ORACLE.build_summary(case.k[:, :, :120], case.v[:, :, :120], cfg, queries=queries)
    for n in (121, 140, 141, 300):
        summary = ORACLE.append(summary, case.k[:, :, :n], case.v[:, :, :n], cfg)
    fresh = ORACLE.build_summary(case.k, case.v, cfg, queries=queries)
    for name in ("kappa", "beta", "nu", "mass"):
        np.testing.assert_allclose(getattr(summary.pages, name), getattr(fresh.pages, name), atol=1e-12)


def test_decode_adds_the_tails_exact_probabilities_to_the_page_mass():
    case = random_case(9, n_tokens=100, n_kv=1, group=3, selection="compact", feature_map="compact", top_k=1000)
    summary = ORACLE.build_summary(case.k, case.v, case.cfg, queries=case.queries())
    before = summary.pages.mass.copy()
    _, stats = ORACLE.decode(case.q, case.k, case.v, summary, case.cfg)
    tau = case.cfg.tau(case.k.shape[-1])
    s = tau * case.q[0] @ case.k[0, 0].T  # budget covers mid: the step is dense
    lse = np.log(np.exp(s - s.max(1, keepdims=True)).sum(1)) + s.max(1)
    np.testing.assert_allclose(stats.lse[0], lse, rtol=1e-12)
    added = summary.pages.mass[0, 0] - before[0, 0]
    np.testing.assert_allclose(added[-16:], np.exp(s - lse[:, None]).sum(0)[-16:], rtol=1e-10)
    assert np.all(added[:-16] == 0)


@pytest.mark.parametrize("fields", FITTED)
def test_huge_scores_stay_finite(fields):
    case = random_case(10, n_tokens=300, group=2, score_scale=1e4 ** 0.5 * 3, page_size=8, **fields)
    _, out, stats = run(case)
    assert np.isfinite(out).all() and np.isfinite(stats.rho).all() and np.isfinite(stats.lse).all()


def test_bad_fitted_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="n_clusters"):
        topkphi.Config(feature_map="cluster", n_clusters=0)
    with pytest.raises(ValueError, match="fit_window"):
        topkphi.Config(fit_window=0)
    with pytest.raises(ValueError, match="selection='compact'"):
        topkphi.Config(selection="page", feature_map="compact")
    case = random_case(11, n_tokens=100, feature_map="cluster")
    with pytest.raises(ValueError, match="reference queries"):
        ORACLE.build_summary(case.k, case.v, case.cfg)
    summary = ORACLE.build_summary(case.k, case.v, case.cfg, queries=case.queries())
    with pytest.raises(ValueError, match="no feature_map state"):
        ORACLE.decode(case.q, case.k, case.v, summary, case.cfg.replace(feature_map="prf"))
    with pytest.raises(ValueError, match="compact page metadata"):
        ORACLE.decode(case.q, case.k, case.v, summary, case.cfg.replace(selection="compact"))


def test_cluster_reads_follow_spec_9():
    case = random_case(12, n_tokens=400, n_kv=2, group=2, top_k=50, feature_map="cluster", n_clusters=16, d=32)
    _, _, stats = run(case)
    d = dv = 32
    n_mid = 400 - 4 - 16
    expected = (4 + 16 + 50) + (16 * (d + dv + 2) + 50 * 2) / (d + dv) + n_mid * d / (d + dv)
    np.testing.assert_allclose(stats.token_equivalents, expected)


def test_only_the_last_fit_window_rows_are_fitted_from():
    case = random_case(13, n_tokens=300, group=2, feature_map="cluster", n_clusters=8)
    cfg = case.cfg.replace(fit_window=4)
    full = ORACLE.build_summary(case.k, case.v, cfg, queries=case.queries())
    last = ORACLE.build_summary(case.k, case.v, cfg, queries=topkphi.ReferenceQueries(case.ref_q[:, :, -4:], end=300))
    np.testing.assert_array_equal(full.estimate.beta, last.estimate.beta)
    wide = ORACLE.build_summary(case.k, case.v, case.cfg, queries=case.queries())
    assert not np.allclose(wide.estimate.metric, full.estimate.metric)
