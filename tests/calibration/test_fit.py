"""The fit: it reduces its objective, and the map it returns really lowers the oracle's output error."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="calibration needs torch")

from topkphi.calibration.fit import FitOptions, fit_layer, fit_model  # noqa: E402
from topkphi.calibration.replay import replay_errors, truncate  # noqa: E402
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


def shifted_capture(seed=3):
    """Another "text": queries on another subspace than low_rank_capture(0)'s, so that fitting the latter
    long enough makes the map worse here."""
    cap = low_rank_capture(seed)
    rng = np.random.default_rng(seed + 100)
    cap.q = (2.5 * rng.standard_normal(cap.q.shape)).astype(np.float32)
    return cap


def as_params(fmap, torch):
    return [torch.as_tensor(np.asarray(a, np.float64)) for a in (fmap.w_q, fmap.b_q, fmap.w_k, fmap.b_k)]


def test_validation_keeps_the_best_scoring_iterate():
    from dataclasses import replace

    import torch

    from topkphi.calibration.fit import _Sequence

    opts = replace(OPTS, validation=1, eval_every=2, steps=40)
    train, val = low_rank_capture(0), shifted_capture()
    fit = fit_layer([train, val], opts)
    assert fit.val_before is not None and fit.val_after <= fit.val_before
    assert fit.best_step is not None and 0 <= fit.best_step <= fit.steps
    # the returned map really scores val_after on the held-out sequence, and no later iterate scored better
    seq = _Sequence(val, opts, torch)
    params = as_params(fit.fmap, torch)
    with torch.no_grad():
        score = float(seq.loss(params, opts.value_weight, torch, opts.merge_weight)[0])
    np.testing.assert_allclose(score, fit.val_after, rtol=1e-6)
    plain = fit_layer([train], replace(OPTS, steps=40))
    p2 = as_params(plain.fmap, torch)
    with torch.no_grad():
        assert score <= float(seq.loss(p2, opts.value_weight, torch, opts.merge_weight)[0]) + 1e-9


def test_split_validation_holds_out_the_last_positions_queries():
    from dataclasses import replace

    from topkphi.calibration.replay import split_validation

    capture = low_rank_capture()
    train, val = split_validation(capture, 64)
    assert train.k.shape[2] == 256 - 64 and train.q.shape[2] == 256 - 64  # no key or query past the cut
    assert val.k.shape[2] == 256 and val.q.shape[2] == 64
    np.testing.assert_array_equal(val.q, capture.q[:, :, -64:])
    fit = fit_layer([train, val], replace(OPTS, validation=1, eval_every=2, steps=20))
    assert fit.val_after <= fit.val_before
    for bad in (0, 256):
        with pytest.raises(ValueError, match="validation needs"):
            split_validation(capture, bad)


def test_validation_needs_a_training_sequence():
    from dataclasses import replace

    with pytest.raises(ValueError, match="validation 1 needs more than 1"):
        fit_layer([low_rank_capture()], replace(OPTS, validation=1))


def test_tied_maps_share_their_directions():
    from dataclasses import replace

    fit = fit_layer([low_rank_capture()], replace(OPTS, tie=True))
    np.testing.assert_array_equal(fit.fmap.w_q, fit.fmap.w_k)
    assert not np.array_equal(fit.fmap.b_q, fit.fmap.b_k)  # separate biases
    assert fit.loss_after < 0.5 * fit.loss_before


def test_lbfgs_reduces_the_objective_in_few_steps():
    from dataclasses import replace

    fit = fit_layer([low_rank_capture()], replace(OPTS, optimizer="lbfgs", steps=10))
    assert fit.loss_after < 0.5 * fit.loss_before


def test_weight_decay_keeps_the_map_near_its_start():
    from dataclasses import replace

    start = fit_layer([low_rank_capture(1)], OPTS).fmap
    free = fit_layer([low_rank_capture(2)], OPTS, init=start).fmap
    held = fit_layer([low_rank_capture(2)], replace(OPTS, weight_decay=1e4), init=start).fmap
    moved = lambda f: float(np.abs(f.w_q - start.w_q).sum() + np.abs(f.w_k - start.w_k).sum())  # noqa: E731
    assert moved(held) < 0.2 * moved(free)


def test_extra_budgets_are_fitted_too():
    from dataclasses import replace

    import torch

    from topkphi.calibration.fit import _sequences, min_tokens

    opts = replace(OPTS, extra_top_k=(24,))
    seqs = _sequences([low_rank_capture()], opts, torch)
    assert [s.top.shape[-1] for s in seqs] == [8, 24]
    assert min_tokens(opts) == min_tokens(OPTS) + 16
    with pytest.raises(ValueError, match="extra_top_k"):
        FitOptions(extra_top_k=(0,))
