"""The fit: it reduces its objective, and the map it returns really lowers the oracle's output error."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="calibration needs torch")

from topkphi.calibration.fit import FitOptions, fit_layer, fit_model, replay_errors, truncate  # noqa: E402
from topkphi.capture import LayerCapture  # noqa: E402


def low_rank_capture(seed=0, n=256, d=8, n_kv=1, group=2, rank=2):
    """Keys and queries on a rank-2 subspace (plus a little noise): an exp-linear map fits them well."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((rank, d))
    k = rng.standard_normal((1, n_kv, n, rank)) @ basis + 0.05 * rng.standard_normal((1, n_kv, n, d))
    q = 1.5 * rng.standard_normal((1, n_kv * group, n, rank)) @ basis
    v = rng.standard_normal((1, n_kv, n, d))
    return LayerCapture(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), scale=d**-0.5)


OPTS = FitOptions(n_features=8, n_sink=2, n_tail=8, top_k=8, steps=60, lr=0.05, stride=4, merge_weight=10.0)


def test_fit_reduces_the_objective():
    fit = fit_layer([low_rank_capture()], OPTS)
    assert fit.steps == OPTS.steps and np.isfinite(fit.loss_after)
    assert fit.loss_after < 0.3 * fit.loss_before
    assert fit.fmap.kind == "learned" and fit.fmap.n_features == 8 and fit.fmap.n_param_heads == 1


def test_fitted_map_beats_top_k_on_held_out_data():
    train, test = low_rank_capture(0), low_rank_capture(0)
    rng = np.random.default_rng(5)  # same subspace, fresh draws: the keys and queries of "another text"
    basis = np.linalg.svd(train.k[0, 0], full_matrices=False)[2][:2]
    test.q = (1.5 * rng.standard_normal((1, 2, 256, 2)) @ basis).astype(np.float32)
    fmap = fit_layer([train], OPTS).fmap
    positions = [250, 252, 255]
    err_phi = replay_errors([test], positions, 2, 8, 8, [fmap]).mean()
    err_top = replay_errors([test], positions, 2, 8, 8 + 9, None).mean()  # Top-K with a few extra tokens
    assert err_phi < 0.7 * err_top


def test_warm_start_and_time_budget():
    cap = low_rank_capture(1)
    first = fit_model([[cap]], OPTS)
    again = fit_model([[truncate(cap, 200)]], OPTS, [f.fmap for f in first], time_budget_s=0.0)
    assert again[0].steps == 0  # no time: the warm start comes back unchanged
    np.testing.assert_allclose(again[0].fmap.w_q, first[0].fmap.w_q)


def test_too_short_sequence_is_a_value_error():
    with pytest.raises(ValueError, match="no calibration query"):
        fit_layer([truncate(low_rank_capture(), 20)], OPTS)
