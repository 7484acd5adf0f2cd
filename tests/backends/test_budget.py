"""Per-head budgets (SPEC 10) in every backend against the float64 oracle: counts, read sets, outputs,
estimated and certified dropped mass; fp32 and bf16 inputs, GQA, every selection."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import topkphi
from tests.cases import random_case, rel_err

ORACLE = topkphi.get_backend("numpy")
CASES = [  # (selection, feature map, budget knobs)
    ("exact", "prf", dict(budget="mass", max_dropped_mass=0.1, top_k=128, min_top_k=8)),
    ("exact", None, dict(budget="mass", max_dropped_mass=0.05, top_k=96, certify=True)),
    ("page", None, dict(budget="mass", max_dropped_mass=0.3, top_k=160, min_top_k=16, certify=True)),
    ("page", "prf", dict(budget="marginal", top_k=48, min_top_k=16)),
    ("compact", "compact", dict(budget="mass", max_dropped_mass=0.1, top_k=128)),
    ("compact", None, dict(budget="marginal", top_k=64)),
]


def _case(seed, selection, fmap, knobs):
    case = random_case(seed, n_kv=2, group=1 + 2 * (seed % 2), n_tokens=290 + 11 * seed, d=32, selection=selection,
                       page_size=8, feature_map=fmap, score_scale=2.0, n_clusters=8)
    return case, case.cfg.replace(**knobs)


def _oracle(case, cfg, selected=None):
    summary = ORACLE.build_summary(case.k, case.v, cfg, case.queries())
    return ORACLE.decode(case.q, case.k, case.v, summary, cfg, selected=selected)


def _check(backend, convert, to64, dtype_name, tol):
    """``convert``: float64 numpy -> the backend's array in the tested dtype; ``to64`` back to float64."""
    for seed in range(2):
        for selection, fmap, knobs in CASES:
            case, cfg = _case(seed, selection, fmap, knobs)
            # the oracle sees exactly the rounded inputs the backend sees
            case = dataclasses.replace(case, **{n: to64(convert(getattr(case, n))) for n in ("q", "k", "v", "ref_q")})
            arrays = [convert(x) for x in (case.q, case.k, case.v)]
            summary = backend.build_summary(arrays[1], arrays[2], cfg, case.queries(convert))
            out, stats = backend.decode(*arrays, summary, cfg)
            ref_out, ref = _oracle(case, cfg)
            label = (seed, selection, fmap, knobs["budget"], dtype_name)
            np.testing.assert_array_equal(to64(stats.budget.units), ref.budget.units, err_msg=str(label))
            np.testing.assert_array_equal(_padded(to64(stats.selected)), _padded(ref.selected), err_msg=str(label))
            assert rel_err(to64(out), ref_out) < tol, label
            np.testing.assert_allclose(to64(stats.budget.delta_hat), ref.budget.delta_hat, atol=tol, err_msg=str(label))
            if cfg.certify:
                np.testing.assert_allclose(to64(stats.budget.delta_bar), ref.budget.delta_bar, atol=tol,
                                           err_msg=str(label))
            np.testing.assert_allclose(to64(stats.token_equivalents), ref.token_equivalents, rtol=1e-6)


def _padded(selected: np.ndarray, width: int = 4096) -> np.ndarray:
    """Read sets compared whatever their padding width."""
    out = np.full((*selected.shape[:2], width), -1, np.int64)
    out[..., : selected.shape[-1]] = selected
    return out


@pytest.mark.parametrize("dtype_name, tol", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_torch_equals_the_oracle(dtype_name, tol):
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, dtype_name)
    _check(topkphi.get_backend("torch"), lambda x: torch.from_numpy(x).to(dtype),
           lambda x: x.to(torch.float64).numpy() if x.is_floating_point() else x.numpy(), dtype_name, tol)


def test_triton_equals_the_oracle_and_says_where_it_selected():
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    backend = topkphi.get_backend("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check(backend, lambda x: torch.from_numpy(x).to(torch.float32).to(device),
           lambda x: x.to(torch.float64).cpu().numpy() if x.is_floating_point() else x.cpu().numpy(), "float32", 1e-4)
    assert backend.last_path.select.startswith("torch ops: the marginal budget's selection")


@pytest.mark.parametrize("dtype_name, tol", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_mlx_equals_the_oracle(dtype_name, tol):
    mx = pytest.importorskip("mlx.core")
    dtype = getattr(mx, dtype_name)
    _check(topkphi.get_backend("mlx"), lambda x: mx.array(x.astype(np.float32)).astype(dtype),
           lambda x: np.array(x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x).astype(np.float64),
           dtype_name, tol)
