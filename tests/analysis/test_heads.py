"""Per-head metrics on synthetic attention whose answers are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

import topkphi
from topkphi.analysis.heads import (
    attention_probs,
    dropped_by_budget,
    inspect_layer,
    inspect_step,
    mid_mass_error,
    normalized_entropy,
    pearson,
    phi_gain,
    region_masses,
    smallest_budget,
    summarize,
)
from topkphi.capture import LayerCapture
from topkphi.regions import Regions


def test_uniform_scores_have_entropy_one():
    q = np.zeros((2, 8))
    k = np.random.default_rng(0).standard_normal((1, 100, 8))
    p = attention_probs(q, k, 0.125)
    assert np.allclose(p, 1 / 100)
    assert normalized_entropy(p) == pytest.approx([1.0, 1.0])


def test_one_hot_score_has_entropy_near_zero():
    k = np.zeros((1, 50, 4))
    k[0, 17] = [100.0, 0, 0, 0]
    q = np.array([[1.0, 0, 0, 0]])
    p = attention_probs(q, k, 1.0)
    assert p[0, 17] == pytest.approx(1.0)
    assert normalized_entropy(p)[0] < 1e-30


def test_entropy_of_a_single_token_is_zero():
    assert normalized_entropy(np.ones((3, 1)))[0] == 0.0


def constructed_case(n_tokens=40, hot=(10, 20, 30), big=3.0):
    """One query head; key j scores ``big`` at ``hot`` positions, 0 elsewhere: softmax in closed form."""
    d = 2
    k = np.zeros((1, n_tokens, d))
    k[0, list(hot), 0] = big
    q = np.array([[1.0, 0.0]])
    return q, k


def test_dropped_mass_equals_the_analytic_value():
    n_tokens, hot, big = 40, (10, 20, 30), 3.0
    q, k = constructed_case(n_tokens, hot, big)
    cfg = topkphi.Config(feature_map="prf", n_sink=2, n_tail=4, top_k=2, selection="exact", scale=1.0)
    regions = Regions.of(n_tokens, cfg.n_sink, cfg.n_tail)
    p = attention_probs(q, k, 1.0)
    z = len(hot) * math.exp(big) + (n_tokens - len(hot))
    # exact Top-2 takes the two first hot keys (ties to the smaller index): 30 and all cold mid keys are dropped
    selected = np.array([[10, 20]])
    masses = region_masses(p, regions, selected)
    n_cold_mid = regions.n_mid - len(hot)
    assert masses["dropped"][0] == pytest.approx((math.exp(big) + n_cold_mid) / z)
    assert masses["sink"][0] == pytest.approx(2 / z) and masses["tail"][0] == pytest.approx(4 / z)
    assert masses["topk"][0] == pytest.approx(2 * math.exp(big) / z)
    budgets, dropped = dropped_by_budget(q, k, p, regions, cfg, 1.0)
    assert dropped[0, 2] == pytest.approx(masses["dropped"][0])
    assert dropped[0, 3] == pytest.approx(n_cold_mid / z)
    assert dropped[0, -1] == pytest.approx(0.0, abs=1e-15)
    # the smallest budget with dropped <= limit: the three hot keys, then cold ones one by one
    limit = (n_cold_mid - 5.5) / z
    assert smallest_budget(budgets, dropped, limit)[0] == 3 + 6


def test_oracle_selection_and_budget_ranking_agree():
    """The mass the oracle's own T drops equals the ranking's at the configured budget, exact and page."""
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((4, 16)), rng.standard_normal((2, 200, 16)), rng.standard_normal((2, 200, 16))
    for selection, top_k in (("exact", 37), ("page", 48)):
        cfg = topkphi.Config(feature_map="prf", n_sink=4, n_tail=16, top_k=top_k, selection=selection, page_size=16,
                             scale=0.25)
        step = inspect_step(q, k, v, cfg, 0.05)
        regions = Regions.of(200, 4, 16)
        budgets, dropped = dropped_by_budget(q, k, attention_probs(q, k, 0.25), regions, cfg, 0.25)
        assert np.allclose(step["dropped_mass"], dropped[:, list(budgets).index(top_k)])
        assert np.allclose(step["sink_mass"] + step["tail_mass"] + step["topk_mass"] + step["dropped_mass"], 1.0)
        # the suggested KV budget meets the limit for every query head of the group
        for h in range(4):
            assert dropped[h, list(budgets).index(step["suggested_top_k_kv"][h])] <= 0.05


def test_mid_mass_error_from_rho_and_dropped():
    # exact part A = 1, true unretrieved D = 1 (dropped 1/2), estimate E = 1.5 (rho 0.6): |E/D - 1| = 0.5
    assert mid_mass_error(np.array([0.6]), np.array([0.5]))[0] == pytest.approx(0.5)
    assert np.isnan(mid_mass_error(np.array([0.0]), np.array([0.0]))[0])


def test_phi_gain_is_bounded_and_signed():
    assert phi_gain(np.array([1.0, 0.5, 0.0, 0.2, 1e-16]), np.array([0.25, 1.0, 0.0, 0.2, 3e-16])).tolist() == [
        0.75, -0.5, 0, 0, 0]


def test_pearson_is_none_for_constant_inputs():
    assert pearson([1, 1, 1], [1, 2, 3]) is None
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)


def test_budget_covering_the_context_is_exact_attention():
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((2, 8)), rng.standard_normal((1, 30, 8)), rng.standard_normal((1, 30, 8))
    step = inspect_step(q, k, v, topkphi.Config(selection="exact", feature_map="prf", n_sink=2, n_tail=4,
                                                top_k=1000, scale=0.3), 0.05)
    assert np.allclose(step["dropped_mass"], 0.0) and np.allclose(step["rho"], 0.0)
    assert np.all(step["err_phi"] < 1e-12) and np.all(step["err_top_k"] < 1e-12)
    assert np.all(np.isnan(step["mid_mass_error"]))


def test_layer_report_averages_steps_and_phi_helps_diffuse_heads():
    """Head 0 of each KV group sees near-uniform scores, head 1 a few sharp keys: phi helps the first."""
    rng = np.random.default_rng(2)
    n_tokens, d = 512, 16
    k = rng.standard_normal((1, 2, n_tokens, d))
    v = rng.standard_normal((1, 2, n_tokens, d))
    q = rng.standard_normal((1, 4, 3, d))
    q[:, [0, 2]] *= 0.05  # diffuse
    q[:, [1, 3]] = 6.0 * k[:, :, None, 100:103].transpose(0, 1, 2, 3, 4)[:, :, 0]  # sharp on keys 100..102
    capture = LayerCapture(q=q, k=k, v=v, scale=d**-0.5)
    rows = inspect_layer(capture, 3, [n_tokens - 3, n_tokens - 2, n_tokens - 1],
                         topkphi.Config(feature_map="prf", n_sink=4, n_tail=16, top_k=16, selection="exact"), 0.05)
    assert [(r.layer, r.q_head, r.kv_head) for r in rows] == [(3, 0, 0), (3, 1, 0), (3, 2, 1), (3, 3, 1)]
    diffuse, sharp = rows[0], rows[1]
    assert diffuse.entropy > 0.9 > sharp.entropy
    assert diffuse.phi_gain > 0 and diffuse.dropped_mass > sharp.dropped_mass
    assert diffuse.suggested_top_k > sharp.suggested_top_k
    assert rows[0].suggested_top_k_kv == max(rows[0].suggested_top_k, rows[1].suggested_top_k)
    summary = summarize(rows)
    assert summary["n_heads"] == 4 and summary["share_high_entropy"] == 0.5
    assert summary["phi_helps"] + summary["phi_hurts"] + summary["phi_neutral"] == 4


def test_mid_mass_error_matches_the_taylor2_estimate_computed_directly():
    """taylor2 estimates exp(s) by 1 + s + s^2/2: the unretrieved-mass estimate is a closed-form sum."""
    rng = np.random.default_rng(4)
    n_tokens, d, scale = 120, 8, 0.2
    q, k, v = rng.standard_normal((1, d)), rng.standard_normal((1, n_tokens, d)), rng.standard_normal((1, n_tokens, d))
    cfg = topkphi.Config(n_sink=4, n_tail=8, top_k=20, selection="exact", feature_map="taylor2", scale=scale)
    step = inspect_step(q, k, v, cfg, 0.05)
    s = scale * k[0] @ q[0]
    mid = np.arange(4, n_tokens - 8)
    unretrieved = mid[np.argsort(-s[mid], kind="stable")[20:]]
    estimate = np.sum(1 + s[unretrieved] + s[unretrieved] ** 2 / 2)
    true = np.sum(np.exp(s[unretrieved]))
    assert step["mid_mass_error"][0] == pytest.approx(abs(estimate / true - 1), rel=1e-9)


@pytest.mark.parametrize("fields", [dict(feature_map="cluster", n_clusters=8),
                                    dict(selection="compact", feature_map="compact", page_size=8)])
def test_fitted_summaries_are_fitted_from_earlier_rows_and_help(fields):
    rng = np.random.default_rng(3)
    n = 300
    k = rng.standard_normal((1, 2, n, 16))
    q = rng.standard_normal((1, 4, 60, 16))
    k[:, :, rng.choice(n, 20, replace=False)] += 1.5 * q[:, ::2, -1:].mean(axis=2, keepdims=True)
    cap = LayerCapture(q=q, k=k, v=rng.standard_normal((1, 2, n, 16)), scale=0.25)
    cfg = topkphi.Config(n_sink=4, n_tail=16, top_k=16, **fields)
    rows = inspect_layer(cap, 0, [n - 2, n - 1], cfg)
    # the estimate is fitted from the rows before each position, and beats Top-K at matched reads here
    assert np.mean([r.err_phi for r in rows]) < np.mean([r.err_top_k for r in rows])
    if cfg.selection == "compact":  # budgets are whole complete pages
        assert all(r.suggested_top_k % 8 == 0 for r in rows)
