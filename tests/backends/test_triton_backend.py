"""The Triton backend against the oracle: the parity matrix through the fused kernel.

On a machine without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py), as CI runs it; bf16 is checked on the GPU only (the interpreter's bf16 dots
are unreliable).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the triton backend needs torch")
pytest.importorskip("triton", reason="the triton backend needs triton (pip install 'topkphi[cuda]')")

import topkphi  # noqa: E402
from tests.cases import PARITY_MATRIX, random_case, rel_err  # noqa: E402

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


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name,fields", MATRIX, ids=[n for n, _ in MATRIX])
def test_parity_with_oracle(backend, name, fields, dtype):
    torch_dtype, tol = DTYPES[dtype]
    case = random_case(sum(map(ord, name)), **fields)
    to = lambda x: torch.from_numpy(x).to(DEVICE, torch_dtype)  # noqa: E731
    q, k, v = to(case.q), to(case.k), to(case.v)
    summary = backend.build_summary(k, v, case.cfg)
    out, stats = backend.decode(q, k, v, summary, case.cfg)
    as64 = lambda x: x.to(torch.float64).cpu().numpy()  # noqa: E731
    rounded = [as64(x) for x in (q, k, v)]  # the oracle sees exactly the backend's inputs
    oracle_summary = ORACLE.build_summary(rounded[1], rounded[2], case.cfg)
    ref, ref_stats = ORACLE.decode(*rounded, oracle_summary, case.cfg, selected=stats.selected.cpu().numpy())
    got = as64(out)
    assert np.isfinite(got).all()
    assert rel_err(got, ref) <= tol, f"{name} {dtype}: {rel_err(got, ref):.2e}"
    np.testing.assert_allclose(stats.rho.cpu().numpy(), ref_stats.rho, atol=max(tol, 1e-4))


def test_is_a_torch_backend_with_the_fused_hot_path(backend):
    from topkphi.backends.torch_backend import TorchBackend

    assert isinstance(backend, TorchBackend) and backend.name == "triton"
    assert type(backend).attend is not TorchBackend.attend
