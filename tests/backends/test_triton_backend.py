"""The Triton backend against the oracle: the parity matrix through the fused kernel, fitted summaries
merged in it, lse, and the one switch that says where each primitive ran.

On a machine without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py), as CI runs it; bf16 is checked on the GPU only (the interpreter's bf16 dots
are unreliable). Fitted rows decode the oracle's fit (its arrays converted to torch), as SPEC 8 asks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the triton backend needs torch")
pytest.importorskip("triton", reason="the triton backend needs triton (pip install 'topkphi[cuda]')")

import topkphi  # noqa: E402
from tests.cases import PARITY_MATRIX, random_case, rel_err  # noqa: E402
from topkphi.backends.base import Backend  # noqa: E402
from topkphi.backends.torch_backend import TorchBackend  # noqa: E402
from topkphi.backends.triton_backend import TRITON, TritonBackend, TritonPath, TritonTuning, triton_path  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"float32": (torch.float32, 1e-4), "float16": (torch.float16, 2e-2)}
if DEVICE == "cuda":
    DTYPES["bfloat16"] = (torch.bfloat16, 2e-2)
ORACLE = topkphi.get_backend("numpy")
# the interpreter runs a program at a time in Python: keep the CPU matrix to the shorter cases
MATRIX = PARITY_MATRIX if DEVICE == "cuda" else [(n, kw) for n, kw in PARITY_MATRIX if kw.get("n_tokens", 0) <= 1100]


@pytest.fixture(scope="module")
def backend():
    return topkphi.get_backend("triton")


def as64(x) -> np.ndarray:
    return x.to(torch.float64).cpu().numpy()


def torch_summary(summary):
    """The oracle's summary in torch arrays: float state float32, labels int64, on DEVICE."""
    def conv(x):
        if not isinstance(x, np.ndarray):
            return x
        out = torch.from_numpy(x).to(DEVICE)
        return out.to(torch.float32) if out.is_floating_point() else out

    def part(p):
        if p is None:
            return None
        return dataclasses.replace(p, **{f.name: conv(getattr(p, f.name)) for f in dataclasses.fields(p)})

    return dataclasses.replace(summary, estimate=part(summary.estimate), pages=part(summary.pages))


def decode_both(backend, case, torch_dtype):
    """``(out, stats, ref, ref_stats, path)``: the backend's step and the oracle's on the same T."""
    q, k, v = (torch.from_numpy(x).to(DEVICE, torch_dtype) for x in (case.q, case.k, case.v))
    rounded = [as64(x) for x in (q, k, v)]  # the oracle sees exactly the backend's inputs
    if case.cfg.fitted:
        oracle_summary = ORACLE.build_summary(rounded[1], rounded[2], case.cfg, queries=case.queries())
        summary = torch_summary(oracle_summary)  # copies: the oracle's decode never writes its arrays in place
    else:
        summary = backend.build_summary(k, v, case.cfg)
        oracle_summary = ORACLE.build_summary(rounded[1], rounded[2], case.cfg)
    path = triton_path(q, k, v, summary, case.cfg)
    out, stats = backend.decode(q, k, v, summary, case.cfg)
    assert backend.last_path == path
    ref, ref_stats = ORACLE.decode(*rounded, oracle_summary, case.cfg, selected=stats.selected.cpu().numpy())
    return out, stats, ref, ref_stats, path


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name,case_fields", MATRIX, ids=[n for n, _ in MATRIX])
def test_parity_with_oracle(backend, name, case_fields, dtype):
    torch_dtype, tol = DTYPES[dtype]
    case = random_case(sum(map(ord, name)), **case_fields)
    out, stats, ref, ref_stats, path = decode_both(backend, case, torch_dtype)
    assert path.attend == TRITON, path  # every matrix row's estimator merges in the fused kernel
    got = as64(out)
    assert np.isfinite(got).all() and out.dtype == torch_dtype
    assert rel_err(got, ref) <= tol, f"{name} {dtype}: {rel_err(got, ref):.2e}"
    np.testing.assert_allclose(stats.rho.cpu().numpy(), ref_stats.rho, atol=max(tol, 1e-4))
    assert stats.lse.dtype == torch.float32
    lse_err = np.abs(stats.lse.cpu().numpy() - ref_stats.lse)
    assert lse_err.max() <= tol * max(1.0, np.abs(ref_stats.lse).max()), lse_err.max()
    np.testing.assert_array_equal(stats.tokens_read.cpu().numpy(), ref_stats.tokens_read)
    np.testing.assert_allclose(stats.token_equivalents.cpu().numpy(), ref_stats.token_equivalents, rtol=1e-6)


@pytest.mark.parametrize(
    "case_fields,select,attend,estimate",
    [
        (dict(selection="page", top_k=32), TRITON, TRITON, TRITON),
        (dict(selection="page", top_k=32, feature_map="cluster", n_clusters=8), TRITON, TRITON, TRITON),
        (dict(selection="page", top_k=32, feature_map=None), TRITON, TRITON, ""),
        (dict(selection="exact", top_k=32), "torch: exact selection", TRITON, TRITON),
        (dict(selection="exact", top_k=32, feature_map="cluster", n_clusters=8), "torch: exact", TRITON, TRITON),
        (dict(selection="compact", top_k=32, feature_map="compact"), TRITON, TRITON, TRITON),
        (dict(selection="compact", top_k=32, feature_map="cluster", n_clusters=8), TRITON, TRITON, TRITON),
        (dict(selection="page", top_k=32, feature_map="taylor2"), TRITON, "torch: taylor2", "torch: taylor2"),
        (dict(selection="page", top_k=4096), "torch: the budget covers mid", TRITON, ""),
    ],
)
def test_one_switch_says_where_each_primitive_runs(backend, case_fields, select, attend, estimate):
    """Exact selection, taylor2 and full budgets take torch by design, and the path says so; clusters and
    compact pages are estimated in the kernels."""
    case = random_case(5, n_tokens=200, n_kv=2, group=2, d=32, **case_fields)
    out, stats, ref, _, path = decode_both(backend, case, torch.float32)
    assert path.select.startswith(select) and path.attend.startswith(attend), path
    assert path.estimate.startswith(estimate) and bool(path.estimate) == bool(estimate), path
    assert rel_err(as64(out), ref) <= 1e-4


def test_other_dtypes_take_the_torch_attend_and_say_why(backend):
    case = random_case(6, n_tokens=200, n_kv=2, group=2, d=32, selection="page", top_k=32)
    q, k, v = (torch.from_numpy(x).to(DEVICE, torch.float32) for x in (case.q, case.k, case.v))
    summary = backend.build_summary(k, v, case.cfg)
    path = triton_path(q.double(), k, v, summary, case.cfg)
    assert path.attend.startswith("torch: the decode kernel takes one of fp16/bf16/fp32") and "float64" in path.attend
    assert path.select.startswith("torch: the bound kernel takes")


@pytest.mark.parametrize("fitted", [dict(feature_map="cluster", n_clusters=8, selection="page"),
                                    dict(feature_map="compact", selection="compact", page_size=8)], ids=str)
def test_decodes_the_fitted_summaries_it_fits_itself(backend, fitted):
    """Cluster and compact summaries built by the backend (torch's fit) decode through the fused merge as
    the torch twin decodes them (the compact tail mass is added to each summary separately)."""
    case = random_case(8, n_tokens=300, n_kv=2, group=2, d=32, top_k=32, **fitted)
    q, k, v = (torch.from_numpy(x).to(DEVICE, torch.float32) for x in (case.q, case.k, case.v))
    queries = case.queries(lambda x: torch.from_numpy(x).to(DEVICE, torch.float32))
    out, stats = backend.decode(q, k, v, backend.build_summary(k, v, case.cfg, queries=queries), case.cfg)
    assert backend.last_path.attend == TRITON and torch.isfinite(out).all()
    twin = TorchBackend()
    twin_out, twin_stats = twin.decode(q, k, v, twin.build_summary(k, v, case.cfg, queries=queries), case.cfg)
    assert rel_err(as64(out), as64(twin_out)) <= 1e-4
    np.testing.assert_allclose(stats.lse.cpu().numpy(), twin_stats.lse.cpu().numpy(), rtol=1e-5, atol=1e-5)
    assert float(stats.rho.max()) > 0.0


def test_is_a_torch_backend_overriding_only_the_hot_primitives():
    assert issubclass(TritonBackend, TorchBackend) and TritonBackend.name == "triton"
    primitives = {name for name in vars(Backend) if not name.startswith("_")}
    assert {name for name in vars(TritonBackend) if name in primitives} == {"read_set", "attend", "unit_masses"}


def test_tuning_is_explicit_and_validated():
    be = topkphi.get_backend("triton", tuning=TritonTuning(chain_launches=False, decode_split=128))
    assert be.tuning == TritonTuning(chain_launches=False, decode_split=128)
    assert TritonBackend().tuning == TritonTuning() and TritonBackend().last_path == TritonPath()
    with pytest.raises(ValueError, match="decode_warps"):
        TritonTuning(decode_warps=0)
    with pytest.raises(TypeError):
        TritonBackend(tuning={"chain_launches": False})
