"""The float64 oracle against the SPEC's own identities: it must be right before anything is compared to it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import topkphi
from tests.cases import random_case, rel_err
from topkphi.backends.numpy_backend import features

ORACLE = topkphi.get_backend("numpy")


def run(case, cfg=None):
    cfg = cfg or case.cfg
    summary = ORACLE.build_summary(case.k, case.v, cfg)
    return ORACLE.decode(case.q, case.k, case.v, summary, cfg)


@pytest.mark.parametrize("selection", ["exact", "page"])
@pytest.mark.parametrize("feature_map", ["prf", "taylor2", None])
def test_budget_covering_mid_is_dense(selection, feature_map):
    case = random_case(1, n_tokens=150, group=3, selection=selection, feature_map=feature_map, top_k=150)
    out, stats = run(case)
    assert rel_err(out, ORACLE.dense(case.q, case.k, case.v)) < 1e-12
    assert np.all(stats.rho == 0)
    assert np.all(stats.tokens_read == 150)


@pytest.mark.parametrize("n_tokens", [1, 5, 20])
def test_empty_mid_is_dense(n_tokens):
    case = random_case(2, n_tokens=n_tokens, n_sink=4, n_tail=16, score_scale=5.0)
    out, stats = run(case)
    assert rel_err(out, ORACLE.dense(case.q, case.k, case.v)) < 1e-12
    assert stats.selected.shape[-1] == 0


@pytest.mark.parametrize("selection", ["exact", "page"])
def test_completion_off_is_softmax_over_read_set(selection):
    case = random_case(3, n_tokens=300, group=4, selection=selection, feature_map=None, top_k=40, page_size=8)
    out, stats = run(case)
    tau = case.k.shape[-1] ** -0.5
    group = 4
    for g in range(case.k.shape[1]):
        chosen = stats.selected[0, g][stats.selected[0, g] >= 0]
        read = np.concatenate([np.arange(4), chosen, np.arange(300 - 16, 300)])
        for h in range(group * g, group * (g + 1)):
            s = tau * case.k[0, g, read] @ case.q[0, h]
            p = np.exp(s - s.max())
            np.testing.assert_allclose(out[0, h], p @ case.v[0, g, read] / p.sum(), rtol=1e-12, atol=1e-14)


def test_prf_is_unbiased():
    # E[phi(q).phi(k)] = exp(<q~, k~>): the mean over n draws lies within 5 standard errors, and 5 standard
    # errors are under 15% of the target, so any bias larger than that fails
    rng = np.random.default_rng(0)
    d, m, n_draws = 16, 8, 4000
    x, y = 0.4 * rng.standard_normal(d), 0.4 * rng.standard_normal(d)
    draws = []
    for seed in range(n_draws):
        fmap = topkphi.FeatureMap.prf(d, m, seed)
        f_q, c_q = features(x[None, None, None], fmap, "q", 1.0)
        f_k, c_k = features(y[None, None, None], fmap, "k", 1.0)
        draws.append(float(np.exp(c_q + c_k).item() * (f_q * f_k).sum()))
    draws = np.array(draws)
    std_err = draws.std() / math.sqrt(n_draws)
    assert abs(draws.mean() - math.exp(x @ y)) < 5 * std_err
    assert 5 * std_err < 0.15 * math.exp(x @ y)


def test_taylor2_kernel_is_second_order_taylor():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal(6), rng.standard_normal(6)
    fmap = topkphi.FeatureMap.taylor2(6)
    f_q, _ = features(x[None, None, None], fmap, "q", 0.3)
    f_k, _ = features(y[None, None, None], fmap, "k", 0.3)
    s = 0.3 * x @ y
    assert fmap.n_features == 1 + 6 + 36
    np.testing.assert_allclose((f_q * f_k).sum(), 1 + s + s * s / 2, rtol=1e-12)


@pytest.mark.parametrize("feature_map", ["prf", "taylor2", "learned"])
@pytest.mark.parametrize("selection", ["exact", "page"])
def test_prefill_then_appends_equals_fresh_build(feature_map, selection):
    case = random_case(4, n_tokens=260, n_kv=2, selection=selection, feature_map=feature_map, page_size=7)
    cfg = case.cfg
    summary = ORACLE.build_summary(case.k[:, :, :3], case.v[:, :, :3], cfg)  # starts with no mid at all
    for n in (4, 20, 21, 22, 40, 41, 100, 177, 260):  # one at a time, several at once, across pages
        summary = ORACLE.append(summary, case.k[:, :, :n], case.v[:, :, :n], cfg)
    fresh = ORACLE.build_summary(case.k, case.v, cfg)
    assert (summary.n_tokens, summary.mid_end) == (fresh.n_tokens, fresh.mid_end) == (260, 244)
    parts = [("estimate", n) for n in ("s", "z", "c_max")] + [("pages", n) for n in ("kmin", "kmax")]
    for part, name in parts:
        a, b = (getattr(getattr(x, part), name, None) for x in (summary, fresh))
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max())
    out_a, _ = ORACLE.decode(case.q, case.k, case.v, summary, cfg)
    out_b, _ = ORACLE.decode(case.q, case.k, case.v, fresh, cfg)
    assert rel_err(out_a, out_b) < 1e-12


def test_decode_refuses_a_stale_summary():
    case = random_case(5, n_tokens=100)
    summary = ORACLE.build_summary(case.k[:, :, :90], case.v[:, :, :90], case.cfg)
    with pytest.raises(ValueError, match="call append"):
        ORACLE.decode(case.q, case.k, case.v, summary, case.cfg)
    with pytest.raises(ValueError, match="shrank"):
        ORACLE.append(summary, case.k[:, :, :50], case.v[:, :, :50], case.cfg)


@pytest.mark.parametrize("n_sink,page_size,top_k", [(4, 16, 64), (3, 5, 7), (0, 8, 3), (10, 4, 40)])
def test_page_selection_takes_whole_pages_within_budget(n_sink, page_size, top_k):
    n_tokens, n_tail = 203, 9
    case = random_case(6, n_tokens=n_tokens, n_kv=3, group=2, selection="page", page_size=page_size,
                       top_k=top_k, n_sink=n_sink, n_tail=n_tail)
    _, stats = run(case)
    mid_start, mid_end = n_sink, n_tokens - n_tail
    for g in range(3):
        chosen = stats.selected[0, g][stats.selected[0, g] >= 0]
        assert np.all((chosen >= mid_start) & (chosen < mid_end)) and len(np.unique(chosen)) == len(chosen)
        pages = np.unique(chosen // page_size)
        assert len(pages) == max(1, top_k // page_size)
        for p in pages:  # every page is taken whole (clipped to mid)
            span = np.arange(max(p * page_size, mid_start), min((p + 1) * page_size, mid_end))
            assert np.isin(span, chosen).all()


def test_page_selection_ranks_by_the_quest_bound():
    case = random_case(7, n_tokens=200, n_kv=1, group=3, selection="page", page_size=10, top_k=30)
    _, stats = run(case)
    k, q, tau = case.k[0, 0], case.q[0], case.k.shape[-1] ** -0.5
    bounds = []
    for p in range(0, 19):  # pages 0..18 hold mid [4, 184)
        keys = k[max(p * 10, 4) : min(p * 10 + 10, 184)]
        kmin, kmax = keys.min(0), keys.max(0)
        bounds.append(max(tau * np.maximum(qh * kmin, qh * kmax).sum() for qh in q))
    expected = np.sort(np.argsort(-np.array(bounds), kind="stable")[:3])
    assert np.array_equal(np.unique(stats.selected[0, 0] // 10), expected)


def test_gqa_shares_one_selection_per_kv_head():
    case = random_case(8, n_tokens=300, n_kv=2, group=4, top_k=25)
    _, stats = run(case)
    tau = case.k.shape[-1] ** -0.5
    for g in range(2):
        scores = tau * case.q[0, 4 * g : 4 * g + 4] @ case.k[0, g, 4:284].T  # the group's query heads
        best = 4 + np.argsort(-scores.max(axis=0), kind="stable")[:25]
        assert np.array_equal(stats.selected[0, g], np.sort(best))
    # one query head's change moves only its own group's selection
    q2 = case.q.copy()
    q2[0, 0] = 40 * case.k[0, 0, 100]
    _, stats2 = ORACLE.decode(q2, case.k, case.v, ORACLE.build_summary(case.k, case.v, case.cfg), case.cfg)
    assert 100 in stats2.selected[0, 0] and np.array_equal(stats2.selected[0, 1], stats.selected[0, 1])


@pytest.mark.parametrize("selection", ["exact", "page"])
@pytest.mark.parametrize("feature_map", ["prf", "taylor2", "learned", None])
@pytest.mark.parametrize("magnitude", [1e2, 1e3, 1e4])
def test_no_nan_or_inf_at_huge_scores(selection, feature_map, magnitude):
    case = random_case(9, n_tokens=200, selection=selection, feature_map=feature_map)
    d = case.k.shape[-1]
    # scale q so the largest |score| reaches the magnitude
    tau = d**-0.5
    peak = np.abs(tau * np.einsum("bhgd,bhnd->bhgn", case.q.reshape(1, 2, 2, d), case.k)).max()
    case.q *= magnitude / peak
    out, stats = run(case)
    assert np.isfinite(out).all() and np.isfinite(stats.rho).all()
    assert np.all((stats.rho >= 0) & (stats.rho <= 1))


def test_rho_is_mass_fraction_and_reads_follow_spec():
    case = random_case(10, n_tokens=400, n_kv=2, group=2, top_k=50, selection="exact", n_features=16, d=32)
    out, stats = run(case)
    assert np.all((stats.rho > 0) & (stats.rho < 1))
    d = dv = 32
    n_mid = 400 - 4 - 16
    expected = (4 + 16 + 50) + 16 * (dv + 1) / (d + dv) + n_mid * d / (d + dv)
    np.testing.assert_allclose(stats.token_equivalents, expected)
    assert np.all(stats.tokens_read == 70)
    page = topkphi.Config(n_sink=4, n_tail=16, top_k=48, selection="page", page_size=16, feature_map=None)
    reads = topkphi.read_counts(page, 4 + 16 + 48, n_mid, False, d, dv)
    assert reads.total == 68 + 2 * math.ceil(n_mid / 16) * 0.5


def test_matched_top_k_gives_the_summary_share_as_tokens():
    cfg = topkphi.Config(selection="exact", feature_map="prf", top_k=64, n_features=64)
    assert topkphi.matched_top_k(cfg, 64) == 64 + math.ceil(64 * 65 / 128)
    assert topkphi.matched_top_k(topkphi.Config(selection="exact", top_k=64, feature_map=None), 64) == 64


def test_completion_recovers_mass_that_top_k_drops():
    # a flat mid region: Top-K alone renormalizes its mass away, the summary estimates it
    rng = np.random.default_rng(11)
    d, n_tokens = 16, 2000
    k = 0.05 * rng.standard_normal((1, 1, n_tokens, d))
    v = rng.standard_normal((1, 1, n_tokens, d)) + 1.0
    v[:, :, :4] -= 1.0
    v[:, :, -16:] -= 1.0
    q = 0.05 * rng.standard_normal((1, 1, d))
    ref = ORACLE.dense(q, k, v)
    topk = topkphi.Config(selection="exact", n_sink=4, n_tail=16, top_k=16, feature_map=None)
    phi = topkphi.Config(selection="exact", n_sink=4, n_tail=16, top_k=16, feature_map="prf", n_features=64)
    err_topk = rel_err(run(type("C", (), {"q": q, "k": k, "v": v, "cfg": topk})())[0], ref)
    err_phi = rel_err(run(type("C", (), {"q": q, "k": k, "v": v, "cfg": phi})())[0], ref)
    assert err_phi < 0.2 * err_topk


@settings(max_examples=25, deadline=None)
@given(
    n_tokens=st.integers(1, 120),
    n_kv=st.integers(1, 3),
    group=st.integers(1, 4),
    n_sink=st.integers(0, 6),
    n_tail=st.integers(0, 20),
    top_k=st.integers(1, 64),
    selection=st.sampled_from(["exact", "page"]),
    page_size=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_any_shape_gives_a_convex_combination(n_tokens, n_kv, group, n_sink, n_tail, top_k, selection, page_size, seed):
    case = random_case(seed, n_tokens=n_tokens, n_kv=n_kv, group=group, d=8, n_sink=n_sink, n_tail=n_tail,
                       top_k=top_k, selection=selection, page_size=page_size, feature_map=None)
    out, stats = run(case)
    # Top-K only is a softmax over the read set: every output lies inside the values' bounding box
    lo = case.v.min(axis=2).repeat(group, axis=1)
    hi = case.v.max(axis=2).repeat(group, axis=1)
    assert np.all(out >= lo - 1e-12) and np.all(out <= hi + 1e-12)
    assert np.all(stats.tokens_read <= n_tokens)
    # a budget of whole pages covers mid only when it holds as many pages as mid can touch
    if (top_k if selection == "exact" else top_k // page_size) >= n_tokens:
        assert rel_err(out, ORACLE.dense(case.q, case.k, case.v)) < 1e-12


@pytest.mark.parametrize("selection", ["exact", "page"])
def test_budget_covering_mid_reads_exactly_the_context(selection):
    case = random_case(12, n_tokens=90, selection=selection, top_k=200, page_size=8)
    _, stats = run(case)
    np.testing.assert_allclose(stats.token_equivalents, 90)  # no summary, no ranking: plain dense reads
