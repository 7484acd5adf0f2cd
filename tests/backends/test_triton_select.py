"""The Triton page-selection path: the bound kernel against float64, the backend's page selection
against the oracle (separated scores, ties at the cut), and the read index against the torch twin.

Runs under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py sets it without a GPU) and on the GPU.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the triton backend needs torch")
pytest.importorskip("triton", reason="the triton backend needs triton (pip install 'topkphi[cuda]')")

import topkphi  # noqa: E402
from tests.cases import random_case, rel_err  # noqa: E402
from topkphi.backends.torch_backend import TorchBackend  # noqa: E402
from topkphi.backends.triton_backend import TRITON, TritonBackend, TritonPath, TritonTuning, triton_path  # noqa: E402
from topkphi.step import plan_step  # noqa: E402
from topkphi.triton.select import KernelReadSet, page_bounds, page_read_set  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ORACLE = topkphi.get_backend("numpy")
TORCH = TorchBackend()
gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")


def as64(x) -> np.ndarray:
    return x.to(torch.float64).cpu().numpy()


def step_inputs(q, k, summary, cfg):
    """``(plan, tau)`` of a decode step, as the skeleton makes them."""
    return plan_step(cfg, summary, k.shape[2], q.shape[-1], k.shape[-1]), cfg.tau(q.shape[-1])


def bound_ref(q, kmin, kmax, tau):
    """SPEC 3 in float64: ``u_p = max_h tau * sum_i max(q_hi kmin_pi, q_hi kmax_pi)``."""
    batch, n_q, d = q.shape
    n_kv = kmin.shape[1]
    qg = q.reshape(batch, n_kv, n_q // n_kv, 1, d)
    terms = np.maximum(qg * kmin[:, :, None], qg * kmax[:, :, None])  # [B,Hkv,G,P,d]
    scale = tau * np.abs(terms).sum(-1).max(2)
    return tau * terms.sum(-1).max(2), scale


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(
    "batch,n_kv,group,d,n_pages",
    [(1, 2, 4, 64, 37), (2, 1, 3, 48, 130), (1, 3, 1, 128, 1), (1, 2, 8, 32, 64), (2, 2, 2, 16, 200)],
)
def test_page_bounds_match_float64(batch, n_kv, group, d, n_pages, dtype):
    gen = torch.Generator().manual_seed(batch * 1000 + n_pages * 7 + d)
    q = torch.randn(batch, n_kv * group, d, generator=gen).to(DTYPES[dtype])
    a = torch.randn(batch, n_kv, n_pages + 9, d, generator=gen)
    b = torch.randn(batch, n_kv, n_pages + 9, d, generator=gen)
    # prefix views of larger buffers, as the summary keeps them
    kmin = torch.minimum(a, b).to(DTYPES[dtype])[:, :, :n_pages]
    kmax = torch.maximum(a, b).to(DTYPES[dtype])[:, :, :n_pages]
    tau = d**-0.5
    ref, scale = bound_ref(as64(q), as64(kmin), as64(kmax), tau)
    # one block per program, and a pipelined walk over several blocks (with sub-block maxima); the
    # elementwise form and the tensor-core form (q+ kmax + q- kmin)
    walks = ({}, dict(block_p=16, blocks_per_program=3, num_stages=2, sub_block=4))
    for use_dot, kw in itertools.product((False, True), walks):
        out = page_bounds(q.to(DEVICE), kmin.to(DEVICE), kmax.to(DEVICE), tau, use_dot=use_dot, **kw)
        u = out[0] if kw else out
        assert u.dtype == torch.float32 and u.shape == (batch, n_kv, n_pages)
        err = np.abs(as64(u) - ref)
        assert np.all(err <= 1e-6 * scale + 1e-30), float((err / scale).max())
        if kw:  # the maxima of runs of 4 pages
            n_sb = -(-n_pages // 4)
            padded = np.pad(as64(u), ((0, 0), (0, 0), (0, 4 * n_sb - n_pages)), constant_values=-np.inf)
            np.testing.assert_array_equal(as64(out[1][..., :n_sb]), padded.reshape(batch, n_kv, n_sb, 4).max(-1))


def _selection_cases():
    out = []
    dtypes = ["float32", "float16", "bfloat16"]
    shapes = [  # (n_tokens, n_kv, group, d, page_size, n_sink, n_tail, top_k)
        (700, 2, 4, 64, 16, 4, 16, 64),  # partial first page (sink 4), partial last page
        (517, 2, 3, 32, 8, 3, 7, 40),
        (300, 4, 1, 16, 5, 3, 7, 17),  # page size not a power of two
        (1024, 1, 8, 128, 16, 16, 64, 128),  # aligned mid: no partial page
        (260, 2, 2, 32, 16, 4, 16, 15),  # K < P: one page
    ]
    for i, shape in enumerate(shapes):
        for batch in (1, 2) if i < 2 else (1,):
            for fm in (None, "prf"):
                out.append((i * 10 + batch, shape, batch, fm, dtypes[(i + batch) % 3]))
    return out


def _margin(q64, kmin, kmax, tau, n_take) -> float:
    u, _ = bound_ref(q64, kmin, kmax, tau)
    ranked = -np.sort(-u, axis=-1)
    return float(np.min((ranked[..., n_take - 1] - ranked[..., n_take]) / np.abs(ranked).max()))


def assert_same_selection(ours, n_selected, ref_selected):
    """``T`` per KV head equals the oracle's (the kernel pads its rows to ``n_take * P`` with -1)."""
    for b, g in np.ndindex(ours.shape[:2]):
        n = int(n_selected[b, g])
        np.testing.assert_array_equal(ours[b, g, :n], ref_selected[b, g][ref_selected[b, g] >= 0])
        assert np.all(ours[b, g, n:] == -1)


def _same_read_set(ours, twin):
    assert torch.equal(ours.idx, twin.idx) and torch.equal(ours.n_selected, twin.n_selected)
    assert ours.n_anchor == twin.n_anchor and torch.equal(ours.n_read, twin.n_read)
    assert torch.equal(ours.n_read32.long(), twin.n_read) and torch.equal(ours.n_read, ours.n_selected + ours.n_anchor)


@pytest.mark.parametrize("seed,shape,batch,feature_map,dtype", _selection_cases())
def test_page_selection_equals_oracle(seed, shape, batch, feature_map, dtype):
    n_tokens, n_kv, group, d, page, n_sink, n_tail, top_k = shape
    case = random_case(seed, batch=batch, n_kv=n_kv, group=group, n_tokens=n_tokens, d=d, feature_map=feature_map,
                       selection="page", page_size=page, n_sink=n_sink, n_tail=n_tail, top_k=top_k)
    q, k, v = (torch.from_numpy(x).to(DEVICE, DTYPES[dtype]) for x in (case.q, case.k, case.v))
    be = TritonBackend()
    summary = be.build_summary(k, v, case.cfg)
    plan, tau = step_inputs(q, k, summary, case.cfg)
    assert plan.selection == "page" and plan.n_take < summary.n_pages
    rounded = [as64(x) for x in (q, k, v)]
    o_sum = ORACLE.build_summary(rounded[1], rounded[2], case.cfg)
    if _margin(rounded[0], o_sum.pages.kmin, o_sum.pages.kmax, tau, plan.n_take) < 1e-5:
        pytest.skip("bounds at the cut too close to compare selections across precisions")
    out, stats = be.decode(q, k, v, summary, case.cfg)
    assert be.last_path == triton_path(q, k, v, summary, case.cfg) and be.last_path.select == TRITON
    _, ref = ORACLE.decode(*rounded, o_sum, case.cfg)
    assert_same_selection(stats.selected.cpu().numpy(), stats.n_selected.cpu().numpy(), ref.selected)
    np.testing.assert_array_equal(stats.n_selected.cpu().numpy(), ref.n_selected)
    np.testing.assert_array_equal(stats.tokens_read.cpu().numpy(), ref.tokens_read)
    np.testing.assert_allclose(stats.token_equivalents.cpu().numpy(), ref.token_equivalents, rtol=1e-6)
    assert torch.isfinite(out).all()

    # the same read set as the torch twin, anchors first
    reads = be.read_set(q, k, summary, plan, case.cfg, tau)
    assert isinstance(reads, KernelReadSet)
    _same_read_set(reads, TORCH.read_set(q, k, summary, plan, case.cfg, tau))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("mode", ["all-equal", "cut-in-a-run", "no-tie-at-cut"])
def test_ties_at_the_cut_go_to_the_smaller_page(mode, dtype):
    """Integer-valued inputs make the bounds exact in fp32 and float64, so ties are real ties."""
    rng = np.random.default_rng(7)
    batch, n_kv, group, d, page, n_tokens = 1, 2, 2, 16, 4, 4 + 160 + 8
    q = rng.integers(-2, 3, size=(batch, n_kv * group, d)).astype(np.float64)
    k = rng.integers(-1, 2, size=(batch, n_kv, n_tokens, d)).astype(np.float64)
    if mode == "all-equal":  # every page has the same extrema: the first n_take pages win
        k[:] = 0.0
        k[:, :, 0::2] = 1.0
        k[:, :, 1::2] = -1.0
    elif mode == "cut-in-a-run":  # 3 clear winners, then a run of 20 tied pages around the cut
        k = rng.integers(-1, 1, size=k.shape).astype(np.float64)  # in {-1, 0}: low bounds
        hot = np.sign(q.reshape(batch, n_kv, group, d).sum(2))
        for p in (30, 5, 17):  # clear winners (pages of 4 from token 4)
            k[:, :, 4 + 4 * p] = 3 * hot
        for p in range(8, 36, 1):
            if p not in (17, 30):
                k[:, :, 4 + 4 * p + 1] = hot
    v = rng.standard_normal((batch, n_kv, n_tokens, d))
    cfg = topkphi.Config(n_sink=4, n_tail=8, top_k=7 * page, selection="page", page_size=page, feature_map=None)
    tq, tk, tv = (torch.from_numpy(x).to(DEVICE, DTYPES[dtype]) for x in (q, k, v))
    be = TritonBackend()
    summary = be.build_summary(tk, tv, cfg)
    _, stats = be.decode(tq, tk, tv, summary, cfg)
    _, ref = ORACLE.decode(q, k, v, ORACLE.build_summary(k, v, cfg), cfg)
    ours = stats.selected.cpu().numpy()
    assert_same_selection(ours, stats.n_selected.cpu().numpy(), ref.selected)
    plan, tau = step_inputs(tq, tk, summary, cfg)
    _same_read_set(be.read_set(tq, tk, summary, plan, cfg, tau), TORCH.read_set(tq, tk, summary, plan, cfg, tau))
    if mode == "all-equal":
        np.testing.assert_array_equal(ours[0, 0], np.arange(4, 4 + 7 * page))


def test_covering_budget_and_exact_selection_say_why_torch_selects():
    case = random_case(3, n_tokens=120, top_k=4096, selection="page", page_size=8, feature_map=None)
    q, k, v = (torch.from_numpy(x).to(DEVICE, torch.float32) for x in (case.q, case.k, case.v))
    be = TritonBackend()
    summary = be.build_summary(k, v, case.cfg)
    _, stats = be.decode(q, k, v, summary, case.cfg)
    assert be.last_path.select.startswith("torch: the budget covers mid") and be.last_path.attend == TRITON
    assert int(stats.n_selected.min()) == 120 - 4 - 16
    exact = case.cfg.replace(selection="exact", top_k=16)
    be.decode(q, k, v, be.build_summary(k, v, exact), exact)
    assert be.last_path.select == "torch: exact selection has no Triton kernel (page and compact selection have)"


@pytest.mark.parametrize("tile", [None, 64])  # 64: the kernel's chunked paths (many sub-blocks, many ties)
@pytest.mark.parametrize(
    "mode,n_pages,n_take",
    [
        ("random", 700, 37),
        ("random", 20000, 129),  # sub-block maxima span two chunks of the bisection
        ("random", 90, 60),  # fewer sub-blocks than chosen pages: every page is a candidate
        ("coarse", 3000, 100),  # few distinct bounds: long runs of ties around the cut
        ("all-equal", 5000, 64),  # every page a candidate, more than one chunk of them
        ("one-hot-blocks", 4000, 50),  # winners packed into few sub-blocks
    ],
)
def test_threshold_selection_equals_the_torch_twin(mode, n_pages, n_take, tile):
    """The threshold selection (sub-block maxima, bisection, no sort) picks the SPEC's pages: the torch
    twin's read set on separated, tied and adversarial bounds, in one tile and in the chunked paths."""
    rng = np.random.default_rng(n_pages + n_take)
    page, d, n_sink, n_tail = 4, 8, 3, 5
    n_tokens = n_sink + page * n_pages - 2 + n_tail  # partial first and last page
    q = rng.standard_normal((1, 6, d))
    k = rng.standard_normal((1, 2, n_tokens, d))
    if mode == "coarse":
        q, k = np.round(q), np.round(k / 2)
    elif mode == "all-equal":
        q = np.ones_like(q)
        k[:] = 0.0
    elif mode == "one-hot-blocks":
        k *= 0.01
        hot = rng.choice(n_pages // 8, size=7, replace=False) * 8 * page + n_sink
        for start in hot:
            k[:, :, start : start + 8 * page] += np.sign(q.reshape(1, 2, 3, d).sum(2))[:, :, None]
    tq, tk = (torch.from_numpy(x).to(DEVICE, torch.float32) for x in (q, k))
    cfg = topkphi.Config(n_sink=n_sink, n_tail=n_tail, top_k=n_take * page, selection="page", page_size=page,
                         feature_map=None)
    summary = TORCH.build_summary(tk, tk, cfg)
    plan, tau = step_inputs(tq, tk, summary, cfg)
    assert plan.n_take == n_take and summary.n_pages in (n_pages, n_pages + 1)
    ours = page_read_set(tq, summary.pages, summary.first_page, tau, n_take, page, plan.regions, tile=tile)
    _same_read_set(ours, TORCH.read_set(tq, tk, summary, plan, cfg, tau))


@gpu
@pytest.mark.gpu
def test_page_decode_replays_in_a_cuda_graph():
    case = random_case(11, n_tokens=3000, n_kv=2, group=4, d=64, selection="page", page_size=16, top_k=256)
    q, k, v = (torch.from_numpy(x).to("cuda", torch.bfloat16) for x in (case.q, case.k, case.v))
    be = TritonBackend()
    summary = be.build_summary(k, v, case.cfg)
    be.decode(q, k, v, summary, case.cfg)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        be.decode(q, k, v, summary, case.cfg)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, g_stats = be.decode(q, k, v, summary, case.cfg)
    q.copy_(torch.flip(q, dims=[1]))
    graph.replay()
    ref, ref_stats = be.decode(q, k, v, summary, case.cfg)
    torch.cuda.synchronize()
    assert torch.equal(out, ref) and torch.equal(g_stats.selected, ref_stats.selected)
    assert torch.equal(g_stats.lse, ref_stats.lse) and be.last_path == TritonPath(TRITON, TRITON)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("feature_map", [None, "prf", "learned"])
def test_chained_launches_match_plain_launches(feature_map):
    """The step's kernels launched as programmatic dependents (sm90+) give the bits of plain launches,
    eagerly and replayed from a CUDA graph, and match the oracle; split decode (merge kernel) included."""
    from topkphi.triton.launch import chains_launches

    case = random_case(12, n_tokens=9000, n_kv=2, group=4, d=128, selection="page", page_size=16, top_k=1024,
                       feature_map=feature_map)
    q, k, v = (torch.from_numpy(x).to("cuda", torch.bfloat16) for x in (case.q, case.k, case.v))
    runs = {}
    for chain in (False, True):
        be = TritonBackend(TritonTuning(chain_launches=chain))
        summary = be.build_summary(k, v, case.cfg)
        eager, stats = be.decode(q, k, v, summary, case.cfg)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, _ = be.decode(q, k, v, summary, case.cfg)
        graph.replay()
        torch.cuda.synchronize()
        runs[chain] = (eager, out.clone(), stats.lse)
        assert be.last_path == TritonPath(TRITON, TRITON)
    assert chains_launches(q, TritonTuning()) == (torch.cuda.get_device_capability()[0] >= 9)
    assert all(torch.equal(a, b) for a, b in zip(runs[False], runs[True]))
    assert torch.equal(runs[True][0], runs[True][1])
    rounded = [as64(x) for x in (q, k, v)]
    ref, _ = ORACLE.decode(*rounded, ORACLE.build_summary(*rounded[1:], case.cfg), case.cfg,
                           selected=stats.selected.cpu().numpy())
    assert rel_err(as64(runs[True][1]), ref) <= 2e-2
