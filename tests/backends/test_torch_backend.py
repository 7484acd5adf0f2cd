"""The torch backend against the float64 oracle: the shared parity matrix, streaming, stats, errors.

Fitted summaries (SPEC 8) are checked twice: decoding the oracle's own fit (converted to torch),
and the torch fit against the identities it must satisfy (its k-means draws differ from NumPy's).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the torch backend cannot run")

import topkphi  # noqa: E402
from tests.cases import PARITY_MATRIX, random_case, rel_err  # noqa: E402
from topkphi.backends.numpy_backend import NumpyBackend  # noqa: E402
from topkphi.backends.torch_backend import TorchBackend  # noqa: E402
from topkphi.summary import ClusterState, CompactPages, FeatureMapState, PageBounds  # noqa: E402

ORACLE = NumpyBackend()
BACKEND = TorchBackend()
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 2e-2}

# Seed i for matrix row i. Row 0 has no mid, so the PRF draw (Config.seed=0 uses the same
# stream as random_case(0)) cannot make mid keys equal to the map's omegas; see test_seed_collision.
CASES = [(i, name, kw) for i, (name, kw) in enumerate(PARITY_MATRIX)]


@pytest.fixture(autouse=True, scope="module")
def _few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(before, 2))
    yield
    torch.set_num_threads(before)


def to_torch(case, dtype, device="cpu"):
    return [torch.as_tensor(x).to(device=device, dtype=dtype) for x in (case.q, case.k, case.v)]


def as64(t) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def queries_of(case, dtype, device="cpu", end=None):
    """The case's reference queries rounded to ``dtype``, as torch tensors."""
    ref_q = torch.as_tensor(case.ref_q).to(device=device, dtype=dtype)
    return topkphi.ReferenceQueries(ref_q, end=case.k.shape[2] if end is None else end)


def as_numpy_queries(queries):
    return topkphi.ReferenceQueries(as64(queries.q), queries.end)


def summary_to_torch(summary: topkphi.Summary, like: torch.Tensor) -> topkphi.Summary:
    """The oracle's summary in the torch backend's storage: float32 state, int32 labels, bounds in
    the cache's dtype (the oracle's bounds are keys of that dtype, so exactly representable)."""
    def conv(x, dtype=torch.float32):
        return torch.as_tensor(np.asarray(x)).to(device=like.device, dtype=dtype)

    est, pages = summary.estimate, summary.pages
    if isinstance(est, FeatureMapState):
        est = FeatureMapState(conv(est.s), conv(est.z), conv(est.c_max))
    elif isinstance(est, ClusterState):
        est = ClusterState(*(conv(getattr(est, f)) for f in ("count", "ksum", "vsum", "beta", "centroids", "metric")),
                           conv(est.labels, torch.int32))
    if isinstance(pages, PageBounds):
        pages = PageBounds(conv(pages.kmin, like.dtype), conv(pages.kmax, like.dtype))
    elif isinstance(pages, CompactPages):
        pages = CompactPages(conv(pages.kappa), conv(pages.beta), conv(pages.nu), conv(pages.mass),
                             pages.first_complete)
    return topkphi.Summary(summary.n_tokens, summary.mid_start, summary.mid_end, summary.first_page, est, pages)


def oracle_summary(k, v, cfg, queries=None):
    """The oracle's summary on exactly what the backend saw (inputs rounded to its dtype)."""
    return ORACLE.build_summary(as64(k), as64(v), cfg, None if queries is None else as_numpy_queries(queries))


def oracle_on(q, k, v, cfg, selected=None, summary=None):
    if summary is None:
        summary = oracle_summary(k, v, cfg)
    return ORACLE.decode(as64(q), as64(k), as64(v), summary, cfg, selected=selected)


def rows(sel: np.ndarray) -> list[np.ndarray]:
    flat = sel.reshape(sel.shape[0] * sel.shape[1], -1)
    return [r[r >= 0] for r in flat]


def check_padding(selected: np.ndarray, n_selected: np.ndarray) -> None:
    """Ascending valid entries first, -1 after; the counts match."""
    for r, n in zip(selected.reshape(n_selected.size, -1), n_selected.reshape(-1)):
        assert (r[:n] >= 0).all() and (r[n:] == -1).all()
        assert (np.diff(r[:n]) > 0).all()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("seed,name,kw", CASES, ids=[c[1] for c in CASES])
def test_parity_matrix(seed, name, kw, dtype):
    """Every row: the torch decode equals the oracle's on the oracle's T-free inputs. Fitted rows
    decode the oracle's fit converted to torch (the torch fit is tested on its own below)."""
    case = random_case(seed, **kw)
    cfg = case.cfg
    q, k, v = to_torch(case, DTYPES[dtype])
    queries = queries_of(case, DTYPES[dtype]) if cfg.fitted else None
    if cfg.fitted:
        ref_summary = oracle_summary(k, v, cfg, queries)
        summary = summary_to_torch(ref_summary, k)
    else:
        ref_summary, summary = oracle_summary(k, v, cfg), BACKEND.build_summary(k, v, cfg)
    own_ref_summary = oracle_summary(k, v, cfg, queries)  # decode mutates compact pages' mass
    out, stats = BACKEND.decode(q, k, v, summary, cfg)
    assert out.dtype == q.dtype and out.shape == (q.shape[0], q.shape[1], v.shape[3])
    assert torch.isfinite(out).all() and torch.isfinite(stats.rho).all() and torch.isfinite(stats.lse).all()
    assert stats.lse.dtype == stats.rho.dtype == torch.float32

    selected = stats.selected.numpy()
    ref, ref_stats = oracle_on(q, k, v, cfg, selected=selected, summary=ref_summary)
    assert rel_err(as64(out), ref) <= TOL[dtype]
    check_padding(selected, stats.n_selected.numpy())
    np.testing.assert_array_equal(stats.n_selected.numpy(), ref_stats.n_selected)
    np.testing.assert_array_equal(stats.tokens_read.numpy(), ref_stats.tokens_read)
    np.testing.assert_allclose(stats.token_equivalents.numpy(), ref_stats.token_equivalents, rtol=1e-6)
    np.testing.assert_allclose(stats.rho.numpy(), ref_stats.rho, atol=1e-5 if dtype == "float32" else 1e-3)
    np.testing.assert_allclose(stats.lse.numpy(), ref_stats.lse, rtol=1e-5, atol=1e-4)
    assert stats.n_tokens == k.shape[2]
    assert 0 < stats.read_fraction()
    if cfg.selection == "compact":  # the step's tail probabilities joined the mass, as in the oracle
        np.testing.assert_allclose(as64(summary.pages.mass), ref_summary.pages.mass, rtol=1e-4, atol=1e-6)

    if dtype == "float32":  # the matrix's scores are separated at fp32 precision: T is the oracle's own
        _, own = oracle_on(q, k, v, cfg, summary=own_ref_summary)
        assert all(np.array_equal(a, b) for a, b in zip(rows(selected), rows(own.selected)))


def test_taylor2_parity():
    case = random_case(3, n_tokens=150, n_kv=2, group=3, d=16, feature_map="taylor2", top_k=20)
    for selection in ("exact", "page"):
        cfg = case.cfg.replace(selection=selection, page_size=4)
        q, k, v = to_torch(case, torch.float32)
        out, stats = BACKEND.decode(q, k, v, BACKEND.build_summary(k, v, cfg), cfg)
        ref, ref_stats = oracle_on(q, k, v, cfg, selected=stats.selected.numpy())
        assert rel_err(as64(out), ref) <= 1e-4
        np.testing.assert_allclose(stats.rho.numpy(), ref_stats.rho, atol=1e-5)


@pytest.mark.parametrize("selection", ["exact", "page"])
@pytest.mark.parametrize("feature_map", ["prf", "learned", None])
def test_prefill_then_appends_equals_fresh_build(selection, feature_map):
    """From an empty mid (N0 <= sink + tail) through single tokens, page-sized and odd steps."""
    case = random_case(5, n_tokens=160, n_kv=2, group=2, d=16, selection=selection, page_size=5,
                       n_sink=3, n_tail=7, top_k=12, feature_map=feature_map)
    q, k, v = to_torch(case, torch.float32)
    cfg = case.cfg
    n = 6
    summary = BACKEND.build_summary(k[:, :, :n], v[:, :, :n], cfg)
    assert summary.n_folded == 0
    for step in (1, 1, 1, 1, 5, 3, 1, 10, 7, 1, 1, 2, 50, 1, 69):
        n += step
        summary = BACKEND.append(summary, k[:, :, :n], v[:, :, :n], cfg)
        fresh = BACKEND.build_summary(k[:, :, :n], v[:, :, :n], cfg)
        assert (summary.n_tokens, summary.mid_end, summary.first_page) == (fresh.n_tokens, fresh.mid_end,
                                                                           fresh.first_page)
        if feature_map is not None:
            a, b = summary.estimate, fresh.estimate
            torch.testing.assert_close(a.c_max, b.c_max, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(a.s, b.s, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.z, b.z, rtol=1e-5, atol=1e-6)
        if selection == "page":
            assert torch.equal(summary.pages.kmin, fresh.pages.kmin)
            assert torch.equal(summary.pages.kmax, fresh.pages.kmax)
        out, _ = BACKEND.decode(q, k[:, :, :n], v[:, :, :n], summary, cfg)
        ref, _ = BACKEND.decode(q, k[:, :, :n], v[:, :, :n], fresh, cfg)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert n == k.shape[2]
    ref64 = ORACLE.build_summary(case.k, case.v, cfg)
    if selection == "page":
        np.testing.assert_allclose(as64(summary.pages.kmin), ref64.pages.kmin, rtol=1e-6)
    if feature_map is not None:
        np.testing.assert_allclose(as64(summary.estimate.s), ref64.estimate.s, rtol=1e-4, atol=1e-5)


def test_append_writes_pages_in_place():
    """Single-token appends reuse the page buffers: no copy of the whole metadata per step."""
    case = random_case(9, n_tokens=120, d=16, selection="page", page_size=4, top_k=8)
    q, k, v = to_torch(case, torch.float32)
    summary = BACKEND.build_summary(k[:, :, :100], v[:, :, :100], case.cfg)
    ptr = summary.pages.kmin.data_ptr()
    for n in range(101, 106):
        summary = BACKEND.append(summary, k[:, :, :n], v[:, :, :n], case.cfg)
    assert summary.pages.kmin.data_ptr() == ptr
    assert torch.equal(summary.pages.kmin, BACKEND.build_summary(k[:, :, :105], v[:, :, :105], case.cfg).pages.kmin)


def test_append_bf16_matches_oracle_summary():
    case = random_case(6, n_tokens=90, n_kv=2, group=2, d=32, selection="page", page_size=8, top_k=16)
    q, k, v = to_torch(case, torch.bfloat16)
    summary = BACKEND.build_summary(k[:, :, :40], v[:, :, :40], case.cfg)
    summary = BACKEND.append(summary, k, v, case.cfg)
    assert summary.estimate.s.dtype == torch.float32 and summary.pages.kmin.dtype == torch.bfloat16
    ref = ORACLE.build_summary(as64(k), as64(v), case.cfg)
    np.testing.assert_allclose(as64(summary.estimate.s), ref.estimate.s, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(as64(summary.pages.kmax), ref.pages.kmax)


def test_exact_ties_go_to_the_smaller_index():
    cfg = topkphi.Config(selection="exact", n_sink=2, n_tail=2, top_k=5, feature_map=None)
    k = torch.ones(1, 1, 30, 8)
    k[0, 0, 20] = 2.0  # the one clear winner; every other mid key ties
    q, v = torch.ones(1, 2, 8), torch.randn(1, 1, 30, 8)
    _, stats = BACKEND.decode(q, k, v, BACKEND.build_summary(k, v, cfg), cfg)
    assert stats.selected[0, 0].tolist() == [2, 3, 4, 5, 20]


def test_page_ties_go_to_the_smaller_page():
    cfg = topkphi.Config(n_sink=3, n_tail=2, top_k=8, selection="page", page_size=4, feature_map=None)
    k, v, q = torch.ones(1, 1, 30, 8), torch.randn(1, 1, 30, 8), torch.ones(1, 1, 8)
    _, stats = BACKEND.decode(q, k, v, BACKEND.build_summary(k, v, cfg), cfg)
    assert stats.selected[0, 0].tolist() == [3, 4, 5, 6, 7, -1, -1, -1]  # page 0 is partial (mid starts at 3)
    assert stats.n_selected.tolist() == [[5]]


def test_dense_matches_oracle():
    case = random_case(7, n_tokens=100, n_kv=2, group=3, d=32, dv=24)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q, k, v = to_torch(case, dtype)
        out = BACKEND.dense(q, k, v)
        assert out.dtype == dtype
        assert rel_err(as64(out), ORACLE.dense(as64(q), as64(k), as64(v))) <= tol
    q, k, v = to_torch(case, torch.float32)
    assert rel_err(as64(BACKEND.dense(q, k, v, scale=0.3)), ORACLE.dense(case.q, case.k, case.v, scale=0.3)) < 1e-5


def test_seed_collision_stays_finite():
    """random_case(0) draws its keys from the stream the PRF map (seed 0) draws omega from, so a few
    mid keys equal omegas and dominate the summary by ~e^37: the residual after subtracting the
    retrieved share is below float32 resolution. Parity is out of reach there; sanity is not."""
    case = random_case(0, **dict(PARITY_MATRIX)["gqa4-page-prf"])
    q, k, v = to_torch(case, torch.float32)
    out, stats = BACKEND.decode(q, k, v, BACKEND.build_summary(k, v, case.cfg), case.cfg)
    assert torch.isfinite(out).all()
    assert ((stats.rho >= 0) & (stats.rho <= 1)).all()


def test_bad_inputs():
    case = random_case(8, n_tokens=60, d=16)
    q, k, v = to_torch(case, torch.float32)
    cfg = case.cfg
    summary = BACKEND.build_summary(k, v, cfg)
    with pytest.raises(ValueError, match="dtype"):
        BACKEND.decode(q.to(torch.int32), k, v, summary, cfg)
    with pytest.raises(ValueError, match="dtype"):
        BACKEND.build_summary(k.to(torch.int64), v, cfg)
    with pytest.raises(ValueError, match="torch tensors"):
        BACKEND.decode(case.q, case.k, case.v, summary, cfg)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        BACKEND.decode(q[:, :3], k, v, summary, cfg)
    with pytest.raises(ValueError, match="does not match"):
        BACKEND.build_summary(k, v[:, :, :10], cfg)
    with pytest.raises(ValueError, match="call append"):
        BACKEND.decode(q, k[:, :, :50], v[:, :, :50], summary, cfg)
    with pytest.raises(ValueError, match="shrank"):
        BACKEND.append(summary, k[:, :, :50], v[:, :, :50], cfg)
    with pytest.raises(ValueError, match="page metadata"):
        BACKEND.decode(q, k, v, summary, cfg.replace(selection="page"))
    with pytest.raises(ValueError, match="KV heads"):
        learned = random_case(8, n_tokens=60, d=16, n_kv=3, feature_map="learned").cfg
        BACKEND.build_summary(k, v, learned)
    with pytest.raises(ValueError, match="empty"):
        BACKEND.dense(q, k[:, :, :0], v[:, :, :0])
    with pytest.raises(ValueError, match="reference queries"):
        BACKEND.build_summary(k, v, cfg.replace(feature_map="cluster"))
    with pytest.raises(ValueError, match="torch tensors"):
        BACKEND.build_summary(k, v, cfg.replace(selection="compact"), topkphi.ReferenceQueries(case.ref_q, 60))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("seed,name,kw", CASES, ids=[c[1] for c in CASES])
def test_cuda_parity(seed, name, kw, dtype):
    """On the GPU the torch backend builds its own summary (fitted ones too), appends, decodes; the
    oracle decodes the same T over the torch summary converted back to float64."""
    case = random_case(seed, **kw)
    cfg = case.cfg
    q, k, v = to_torch(case, DTYPES[dtype], "cuda")
    queries = queries_of(case, DTYPES[dtype], "cuda", end=k.shape[2] - 3) if cfg.fitted else None
    summary = BACKEND.build_summary(k[:, :, :-3], v[:, :, :-3], cfg, queries)
    summary = BACKEND.append(summary, k, v, cfg)
    ref_summary = summary_to_numpy(summary)
    out, stats = BACKEND.decode(q, k, v, summary, cfg)
    assert out.is_cuda and torch.isfinite(out).all()
    ref, ref_stats = oracle_on(q, k, v, cfg, selected=stats.selected.cpu().numpy(), summary=ref_summary)
    assert rel_err(as64(out), ref) <= TOL[dtype]
    np.testing.assert_allclose(stats.rho.cpu().numpy(), ref_stats.rho, atol=1e-5 if dtype == "float32" else 1e-3)
    np.testing.assert_allclose(stats.lse.cpu().numpy(), ref_stats.lse, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(stats.tokens_read.cpu().numpy(), ref_stats.tokens_read)


def summary_to_numpy(summary: topkphi.Summary) -> topkphi.Summary:
    """A torch summary as the oracle's float64 (int64 labels) arrays."""
    def conv(x):
        return x.detach().cpu().to(torch.float64 if x.is_floating_point() else torch.int64).numpy()

    est, pages = summary.estimate, summary.pages
    if est is not None:
        est = type(est)(*(conv(getattr(est, f)) for f in est.__dataclass_fields__))
    if isinstance(pages, PageBounds):
        pages = PageBounds(conv(pages.kmin), conv(pages.kmax))
    elif isinstance(pages, CompactPages):
        pages = CompactPages(conv(pages.kappa), conv(pages.beta), conv(pages.nu), conv(pages.mass),
                             pages.first_complete)
    return topkphi.Summary(summary.n_tokens, summary.mid_start, summary.mid_end, summary.first_page, est, pages)
