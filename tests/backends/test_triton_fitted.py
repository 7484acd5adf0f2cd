"""The fitted estimates inside the Triton kernels (SPEC 8) against the NumPy oracle.

Clusters: per-cluster sums of the retrieved rows gathered in the read tiles and C pseudo-tokens in the
merge; compact selection: the compact tokens' scores in the bound kernel, the threshold select with the
fragments of mid, the unread pages as pseudo-token splits. Fresh seeded inputs, fp32 and fp16 (bf16 on
the GPU), GQA, several shapes and split layouts; each step decodes the oracle's own fit (its arrays in
torch) on the T the kernels chose, so selection near-ties cannot move the comparison.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the triton backend needs torch")
pytest.importorskip("triton", reason="the triton backend needs triton (pip install 'topkphi[cuda]')")

import topkphi  # noqa: E402
from tests.backends.test_triton_backend import as64, torch_summary  # noqa: E402
from tests.cases import random_case, rel_err  # noqa: E402
from topkphi.backends.torch_backend import TorchBackend  # noqa: E402
from topkphi.backends.triton_backend import TRITON, TritonBackend, TritonTuning  # noqa: E402
from topkphi.step import plan_step  # noqa: E402
from topkphi.triton.select import KernelReadSet, compact_read_set, compact_scores  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"float32": (torch.float32, 1e-4), "float16": (torch.float16, 2e-2)}
if DEVICE == "cuda":
    DTYPES["bfloat16"] = (torch.bfloat16, 2e-2)
ORACLE = topkphi.get_backend("numpy")
# default launch, and many small read and page splits (the merge sums the retrieved members over splits)
TUNINGS = {"default": TritonTuning(), "splits": TritonTuning(decode_split=16, decode_block_n=16, decode_page_split=16)}


def fitted_step(seed, dtype, tuning="default", **fields):
    """``(be, q, k, v, summary, oracle_summary, rounded, case)``: the oracle's fit of a fresh case, in torch."""
    case = random_case(seed, **fields)
    torch_dtype = DTYPES[dtype][0]
    q, k, v = (torch.from_numpy(x).to(DEVICE, torch_dtype) for x in (case.q, case.k, case.v))
    rounded = [as64(x) for x in (q, k, v)]
    queries = case.queries(lambda x: torch.from_numpy(x).to(torch_dtype).double().numpy())
    o_sum = ORACLE.build_summary(rounded[1], rounded[2], case.cfg, queries=queries)
    return TritonBackend(TUNINGS[tuning]), q, k, v, torch_summary(o_sum), o_sum, rounded, case


def check_step(be, q, k, v, summary, o_sum, rounded, cfg, tol):
    """Decode with the kernels, then the oracle on the kernels' T: out, rho, lse and reads agree."""
    out, stats = be.decode(q, k, v, summary, cfg)
    ref, ref_stats = ORACLE.decode(*rounded, o_sum, cfg, selected=stats.selected.cpu().numpy())
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    assert rel_err(as64(out), ref) <= tol, rel_err(as64(out), ref)
    np.testing.assert_allclose(stats.rho.cpu().numpy(), ref_stats.rho, atol=max(tol, 1e-4))
    lse_err = np.abs(stats.lse.cpu().numpy() - ref_stats.lse).max()
    assert lse_err <= tol * max(1.0, np.abs(ref_stats.lse).max()), lse_err
    np.testing.assert_array_equal(stats.tokens_read.cpu().numpy(), ref_stats.tokens_read)
    np.testing.assert_allclose(stats.token_equivalents.cpu().numpy(), ref_stats.token_equivalents, rtol=1e-6)
    return stats, ref_stats


CLUSTER_CASES = [  # (name, random_case fields)
    ("mha-page-c8", dict(n_tokens=300, n_kv=2, group=1, d=32, selection="page", page_size=8, top_k=48, n_clusters=8)),
    ("gqa4-page-c32-d128", dict(n_tokens=517, n_kv=2, group=4, d=128, selection="page", top_k=64, n_clusters=32)),
    ("gqa3-exact-c16-dv48", dict(n_tokens=333, n_kv=2, group=3, d=64, dv=48, top_k=40, n_clusters=16)),
    ("gqa2-compact-c8-batch2", dict(batch=2, n_tokens=300, n_kv=2, group=2, d=64, selection="compact", page_size=8,
                                    top_k=32, n_clusters=8)),
    ("gqa8-page-c5", dict(n_tokens=400, n_kv=1, group=8, d=64, selection="page", page_size=16, top_k=96,
                          n_clusters=5)),
]


@pytest.mark.parametrize("tuning", list(TUNINGS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name,fields", CLUSTER_CASES, ids=[n for n, _ in CLUSTER_CASES])
def test_cluster_estimate_in_the_kernels_matches_the_oracle(name, fields, dtype, tuning):
    be, q, k, v, summary, o_sum, rounded, case = fitted_step(sum(map(ord, name)), dtype, tuning,
                                                             feature_map="cluster", **fields)
    stats, ref_stats = check_step(be, q, k, v, summary, o_sum, rounded, case.cfg, DTYPES[dtype][1])
    assert be.last_path.attend == TRITON and be.last_path.estimate == TRITON, be.last_path
    assert ref_stats.rho.max() > 1e-3  # the estimate carries mass: the comparison tests it


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_clusters_whose_members_were_all_retrieved_drop_out(dtype):
    """C close to |mid| and a budget over half of mid: many clusters lose every member to T (n'_c = 0),
    others keep a few; the exact subtraction of the retrieved members' counts, scores and values holds."""
    be, q, k, v, summary, o_sum, rounded, case = fitted_step(11, dtype, "splits", feature_map="cluster",
                                                             n_tokens=120, n_kv=2, group=2, d=32, top_k=64,
                                                             n_clusters=40, n_tail=8)
    stats, _ = check_step(be, q, k, v, summary, o_sum, rounded, case.cfg, DTYPES[dtype][1])
    labels, count = o_sum.estimate.labels, o_sum.estimate.count
    emptied = 0
    for b, g in np.ndindex(count.shape[:2]):
        t = stats.selected[b, g].cpu().numpy()
        taken = np.bincount(labels[b, g, t[t >= 0]], minlength=count.shape[-1])
        emptied += int(((count[b, g] > 0) & (taken == count[b, g])).sum())
        assert ((count[b, g] - taken) > 0).any()  # something is left to estimate
    assert emptied > 0


@pytest.mark.parametrize("fitted", ["cluster", "compact"])
def test_a_budget_covering_mid_is_exact_attention(fitted):
    be, q, k, v, summary, o_sum, rounded, case = fitted_step(
        4, "float32", feature_map=fitted, n_tokens=150, n_kv=2, group=2, d=32, top_k=4096,
        selection="compact" if fitted == "compact" else "page", page_size=8, n_clusters=8)
    out, stats = be.decode(q, k, v, summary, case.cfg)
    assert be.last_path.estimate == "" and float(stats.rho.abs().max()) == 0.0
    assert rel_err(as64(out), as64(TorchBackend().dense(q, k, v))) <= 1e-5


COMPACT_CASES = [
    ("gqa4-p16-sink5", dict(n_tokens=517, n_kv=2, group=4, d=64, page_size=16, top_k=64, n_sink=5)),
    ("mha-p8-aligned", dict(n_tokens=400, n_kv=2, group=1, d=32, page_size=8, top_k=40, n_sink=8, n_tail=16)),
    ("gqa3-p5-dv24", dict(n_tokens=333, n_kv=1, group=3, d=32, dv=24, page_size=5, top_k=25, n_sink=3, n_tail=7)),
    ("gqa2-p4-batch2-many-pages", dict(batch=2, n_tokens=700, n_kv=2, group=2, d=32, page_size=4, top_k=48)),
    ("gqa8-p16-d128", dict(n_tokens=800, n_kv=1, group=8, d=128, page_size=16, top_k=128)),
]


@pytest.mark.parametrize("tuning", list(TUNINGS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name,fields", COMPACT_CASES, ids=[n for n, _ in COMPACT_CASES])
def test_compact_pages_in_the_kernels_match_the_oracle(name, fields, dtype, tuning):
    """Compact selection in the kernels; the unread pages as pseudo-tokens: the oracle's estimate on its T."""
    be, q, k, v, summary, o_sum, rounded, case = fitted_step(sum(map(ord, name)), dtype, tuning,
                                                             feature_map="compact", selection="compact", **fields)
    _, ref_stats = check_step(be, q, k, v, summary, o_sum, rounded, case.cfg, DTYPES[dtype][1])
    assert be.last_path.select == TRITON and be.last_path.estimate == TRITON, be.last_path
    assert ref_stats.rho.max() > 1e-3


def _scores64(q64, o_sum, tau):
    batch, n_q, d = q64.shape
    kappa, beta = o_sum.pages.kappa, o_sum.pages.beta
    q_g = q64.reshape(batch, kappa.shape[1], -1, d)
    return tau * np.einsum("bhgd,bhpd->bhgp", q_g, kappa.astype(np.float32).astype(np.float64)) + \
        beta.astype(np.float32)[:, :, None]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name,fields", COMPACT_CASES[:4], ids=[n for n, _ in COMPACT_CASES[:4]])
def test_compact_selection_takes_the_best_pages_and_the_fragments(name, fields, dtype):
    """Scores and logits against float64; the kernels' T is the oracle's own selection (margin permitting)
    and the torch twin's read set, fragments included, in the one tile and in the chunked path."""
    be, q, k, v, summary, o_sum, rounded, case = fitted_step(sum(map(ord, name)) + 1, dtype, feature_map=None,
                                                             selection="compact", **fields)
    cfg, tau = case.cfg, case.cfg.tau(q.shape[-1])
    plan = plan_step(cfg, summary, k.shape[2], q.shape[-1], v.shape[-1])
    ref = _scores64(rounded[0], o_sum, tau)  # [B,Hkv,G,n]
    u, logits, _ = compact_scores(q, summary.pages.kappa, summary.pages.beta, tau)
    # exact products under the interpreter; on the GPU fp32 tokens meet a 16-bit q as hi + lo halves
    scale = np.abs(ref).max() * (1e-6 if DEVICE == "cpu" else 3e-5)
    np.testing.assert_allclose(as64(u), ref.max(2), atol=scale)
    n = ref.shape[-1]
    np.testing.assert_allclose(as64(logits[:, :, :n]).reshape(ref.shape), ref, atol=scale)
    twin = TorchBackend().read_set(q, k, summary, plan, cfg, tau)
    for tile in (None, 64):  # 64: the chunked paths
        reads = compact_read_set(q, summary.pages, tau, plan.n_take, cfg.page_size, plan.regions, tile=tile)
        assert isinstance(reads, KernelReadSet) and reads.pages is not None
        ranked = -np.sort(-ref.max(2), axis=-1)
        if np.min(ranked[..., plan.n_take - 1] - ranked[..., plan.n_take]) < 10 * scale:
            pytest.skip("scores at the cut too close to compare selections across precisions")
        assert torch.equal(reads.idx, twin.idx) and torch.equal(reads.n_selected, twin.n_selected)
        assert torch.equal(reads.n_read32.long(), twin.n_read)
        # the chosen pages' logits are knocked out, every other page keeps its own
        chosen = torch.zeros(ref.shape[0] * ref.shape[1], n, dtype=torch.bool)
        for row, t in enumerate(twin.selected.reshape(-1, twin.selected.shape[-1]).cpu()):
            pages = t[t >= 0] // cfg.page_size - summary.pages.first_complete
            chosen[row, pages[(pages >= 0) & (pages < n)]] = True
        mask = np.broadcast_to(chosen.numpy().reshape(*ref.shape[:2], 1, n), ref.shape)
        got = as64(reads.pages.logits[:, :, :n]).reshape(ref.shape)
        assert np.isneginf(got[mask]).all() and mask.any()
        np.testing.assert_allclose(got[~mask], ref[~mask], atol=scale)
    _, ref_stats = ORACLE.decode(*rounded, o_sum, cfg)
    _, stats = be.decode(q, k, v, summary, cfg)
    np.testing.assert_array_equal(stats.selected.cpu().numpy(), ref_stats.selected)
