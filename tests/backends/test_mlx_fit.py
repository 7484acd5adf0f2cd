"""The MLX fits of the fitted summaries (SPEC 8): clusters against their own labels and the oracle's
formulas, fold-in, compact pages and their masses against the oracle."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'mlx[cpu]' on Linux)")

import topkphi  # noqa: E402
from tests.cases import random_case, rel_err  # noqa: E402
from topkphi.backends import numpy_fit  # noqa: E402
from topkphi.backends.mlx_backend import to_mlx_summary  # noqa: E402
from topkphi.summary import ReferenceQueries  # noqa: E402

ORACLE = topkphi.get_backend("numpy")
MLX = topkphi.get_backend("mlx")
CLUSTER = dict(n_tokens=333, n_kv=2, group=3, d=32, top_k=40, feature_map="cluster", n_clusters=16)


def f32_case(case):
    return case.rounded(np.float32)


def as_mx(case):
    return (mx.array(x.astype(np.float32)) for x in (case.q, case.k, case.v))


def as64(x):
    return np.array(x).astype(np.float64)


def cluster_fit(case):
    _, k, v = as_mx(case)
    return MLX.build_summary(k, v, case.cfg, queries=case.queries(mx.array))


@pytest.mark.parametrize("seed", [0, 1])
def test_cluster_statistics_are_those_of_its_own_labels(seed):
    case = f32_case(random_case(seed, **CLUSTER))
    summary = cluster_fit(case)
    st = summary.estimate
    assert st.labels.dtype == mx.int32 and st.count.dtype == mx.float32
    labels = np.array(st.labels)
    lo, hi = summary.mid_start, summary.mid_end
    assert np.all(labels[..., :lo] == -1) and np.all(labels[..., hi: case.k.shape[2]] == -1)
    mid = labels[..., lo:hi]
    assert mid.min() >= 0 and mid.max() < case.cfg.n_clusters
    hot = np.eye(case.cfg.n_clusters)[mid]  # [B,H,n,C]
    np.testing.assert_array_equal(as64(st.count), hot.sum(axis=2))
    np.testing.assert_allclose(as64(st.ksum), np.einsum("bhnc,bhnd->bhcd", hot, case.k[:, :, lo:hi]), rtol=1e-5,
                               atol=1e-4)
    np.testing.assert_allclose(as64(st.vsum), np.einsum("bhnc,bhnd->bhcd", hot, case.v[:, :, lo:hi]), rtol=1e-5,
                               atol=1e-4)
    assert len(np.unique(mid[0, 0])) > case.cfg.n_clusters // 2  # k-means++ spreads the clusters out


def test_cluster_fit_follows_the_oracle_formulas_on_its_own_labels():
    """Metric, nearest-centroid labels and beta, recomputed in float64 from the MLX fit's centroids and labels."""
    case = f32_case(random_case(3, **CLUSTER))
    summary = cluster_fit(case)
    st = summary.estimate
    cfg, lo, hi = case.cfg, summary.mid_start, summary.mid_end
    batch, n_kv, n_tokens, d = case.k.shape
    group, window = case.q.shape[1] // n_kv, case.ref_q.shape[2]
    positions = np.tile(np.arange(n_tokens - window, n_tokens), group)
    for b, g in np.ndindex(batch, n_kv):
        rows = case.ref_q[b, g * group:(g + 1) * group].reshape(group * window, d)
        metric = numpy_fit.query_metric(rows)
        np.testing.assert_allclose(as64(st.metric[b, g]), metric, rtol=1e-5, atol=1e-6)
        labels = np.array(st.labels[b, g, lo:hi])
        centroids = as64(st.centroids[b, g])
        np.testing.assert_array_equal(labels, numpy_fit.metric_labels(case.k[b, g, lo:hi], centroids, metric))
        hot = np.eye(cfg.n_clusters)[labels]
        beta = numpy_fit.fit_beta(rows, positions, case.k[b, g], hot, lo, hi, cfg.n_sink, cfg.n_tail, cfg.top_k,
                                  cfg.tau(d))
        np.testing.assert_allclose(as64(st.beta[b, g]), beta, atol=1e-4)
    assert np.abs(as64(st.beta)).max() > 1e-2  # the correction is not trivially zero


def _inertia(st, k, lo, hi) -> float:
    """k-means objective under the query metric: ``sum_j (k_j - mu_c(j))^T M (k_j - mu_c(j))``."""
    centroids, metric, labels = as64(st.centroids), as64(st.metric), np.array(st.labels)[..., lo:hi]
    total = 0.0
    for b, g in np.ndindex(k.shape[:2]):
        diff = k[b, g, lo:hi] - centroids[b, g][labels[b, g]]
        total += float(np.einsum("nd,de,ne->", diff, metric[b, g], diff))
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_is_as_tight_as_the_oracle(seed):
    """Other draws, the same algorithm: k-means++ seeding alone is ~1.7x looser than after Lloyd."""
    case = f32_case(random_case(seed, **CLUSTER))
    ours = cluster_fit(case)
    ref = ORACLE.build_summary(case.k, case.v, case.cfg, queries=case.queries())
    lo, hi = ref.mid_start, ref.mid_end
    assert _inertia(ours.estimate, case.k, lo, hi) < 1.15 * _inertia(ref.estimate, case.k, lo, hi)


def test_own_cluster_fit_beats_top_k_only():
    case = f32_case(random_case(4, **CLUSTER))
    q, k, v = as_mx(case)
    dense = ORACLE.dense(case.q, case.k, case.v)
    out, stats = MLX.decode(q, k, v, cluster_fit(case), case.cfg)
    top_only = case.cfg.replace(feature_map=None)
    base, _ = MLX.decode(q, k, v, MLX.build_summary(k, v, top_only), top_only)
    assert rel_err(np.array(out), dense) < 0.5 * rel_err(np.array(base), dense)
    assert 0 < float(stats.rho.mean().item()) < 1


def test_cluster_prefill_then_appends_equals_one_fold():
    """Fold-in with frozen centroids: chunks equal one big fold, and the oracle's rule (seeding while
    fewer than C clusters exist, then the nearest centroid under M) on the same state."""
    n0, n_final = 12, 160  # mid holds 5 tokens at prefill: 3 more seed clusters, the rest join the nearest
    case = f32_case(random_case(9, n_tokens=n_final, d=16, n_sink=3, n_tail=4, top_k=10, feature_map="cluster",
                                n_clusters=8))
    _, k, v = as_mx(case)
    queries = ReferenceQueries(mx.array(case.ref_q[:, :, :6].astype(np.float32)), end=n0)

    def prefill():
        return MLX.build_summary(k[:, :, :n0], v[:, :, :n0], case.cfg, queries=queries)

    start = prefill()
    assert int(start.estimate.count.sum().item()) == 5 * 2  # 5 mid tokens in each of 2 KV heads
    chunked, n = prefill(), n0
    for step in (1, 1, 1, 5, 30, 1, 7, 58, 44):
        n += step
        chunked = MLX.append(chunked, k[:, :, :n], v[:, :, :n], case.cfg)
    once = MLX.append(prefill(), k, v, case.cfg)
    ref = ORACLE.append(to_numpy(start), case.k, case.v, case.cfg)
    assert chunked.mid_end == once.mid_end == ref.mid_end == n_final - case.cfg.n_tail
    mid = slice(case.cfg.n_sink, chunked.mid_end)
    for other in (once.estimate, ref.estimate):
        np.testing.assert_array_equal(np.array(chunked.estimate.labels[..., mid]), np.array(other.labels[..., mid]))
        for field in ("count", "ksum", "vsum", "centroids", "beta"):
            np.testing.assert_allclose(as64(getattr(chunked.estimate, field)), as64(getattr(other, field)),
                                       rtol=1e-5, atol=1e-5, err_msg=field)
    seeded = np.array(ref.estimate.centroids[:, :, 5:8])
    np.testing.assert_array_equal(seeded, case.k[:, :, 8:11])  # positions n_sink + 5 .. seeded clusters 5..7


def to_numpy(summary):
    """An MLX summary with NumPy arrays, for the oracle."""
    def convert(part):
        if part is None:
            return None
        arrays = {name: np.array(value) for name, value in vars(part).items() if isinstance(value, mx.array)}
        wide = {n: a.astype(np.int64 if a.dtype.kind == "i" else np.float64) for n, a in arrays.items()}
        return replace(part, **wide)

    return replace(summary, estimate=convert(summary.estimate), pages=convert(summary.pages))


COMPACT = dict(n_tokens=517, n_kv=2, group=4, d=64, selection="compact", page_size=16, top_k=64,
               feature_map="compact", n_sink=5)


def test_compact_pages_equal_the_oracle_fit():
    case = f32_case(random_case(2, **COMPACT))
    _, k, v = as_mx(case)
    ours = MLX.build_summary(k, v, case.cfg, queries=case.queries(mx.array)).pages
    ref = ORACLE.build_summary(case.k, case.v, case.cfg, queries=case.queries()).pages
    assert ours.first_complete == ref.first_complete and ours.kappa.shape == ref.kappa.shape
    np.testing.assert_allclose(as64(ours.mass), ref.mass, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(as64(ours.kappa), ref.kappa)  # a stored key: exact
    np.testing.assert_allclose(as64(ours.beta), ref.beta, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(as64(ours.nu), ref.nu, rtol=1e-4, atol=1e-5)


def test_a_page_no_query_attended_is_its_mean_token():
    case = f32_case(random_case(2, **COMPACT))
    _, k, v = as_mx(case)
    pages = MLX.build_summary(k, v, case.cfg).pages  # no reference queries: no mass anywhere
    first, size = pages.first_complete, case.cfg.page_size
    n = pages.kappa.shape[2]
    keys = case.k[:, :, first * size:(first + n) * size].reshape(1, 2, n, size, -1)
    values = case.v[:, :, first * size:(first + n) * size].reshape(1, 2, n, size, -1)
    np.testing.assert_allclose(as64(pages.kappa), keys.mean(axis=3), atol=1e-6)
    np.testing.assert_allclose(as64(pages.nu), values.mean(axis=3), atol=1e-6)
    np.testing.assert_allclose(as64(pages.beta), np.log(size), rtol=1e-6)


def test_compact_decode_steps_and_appends_follow_the_oracle():
    """Tail mass from decode steps, then pages fitted from it as they leave the tail (SPEC 8.2)."""
    n0, steps = 300, 40
    case = f32_case(random_case(6, **{**COMPACT, "n_tokens": n0 + steps, "n_tail": 24}))
    q_all = np.random.default_rng(0).standard_normal((steps, *case.q.shape))
    q_all = q_all.astype(np.float32).astype(np.float64)
    _, k, v = as_mx(case)
    queries = ReferenceQueries(mx.array(case.ref_q.astype(np.float32)), end=n0)
    ours = MLX.build_summary(k[:, :, :n0], v[:, :, :n0], case.cfg, queries=queries)
    ref = ORACLE.build_summary(case.k[:, :, :n0], case.v[:, :, :n0], case.cfg,
                               queries=ReferenceQueries(case.ref_q, end=n0))
    n_prefill = ref.n_pages
    for i in range(steps):
        n = n0 + i
        kn, vn = case.k[:, :, :n], case.v[:, :, :n]
        if i:
            ours = MLX.append(ours, k[:, :, :n], v[:, :, :n], case.cfg)
            ref = ORACLE.append(ref, kn, vn, case.cfg)
        _, stats = MLX.decode(mx.array(q_all[i].astype(np.float32)), k[:, :, :n], v[:, :, :n], ours, case.cfg)
        _, ref_stats = ORACLE.decode(q_all[i], kn, vn, ref, case.cfg, selected=np.array(stats.selected))
        np.testing.assert_allclose(np.array(stats.lse), ref_stats.lse, rtol=1e-5)
    assert ours.n_pages == ref.n_pages > n_prefill  # pages were completed during decode
    length = ref.pages.mass.shape[2]
    np.testing.assert_allclose(as64(ours.pages.mass)[..., :length], ref.pages.mass, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(as64(ours.pages.kappa), ref.pages.kappa)
    np.testing.assert_allclose(as64(ours.pages.beta), ref.pages.beta, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(as64(ours.pages.nu), ref.pages.nu, rtol=1e-4, atol=1e-5)


def test_converted_oracle_summaries_decode_like_own_ones():
    """``to_mlx_summary`` of the MLX backend's own fit (through NumPy) changes nothing."""
    case = f32_case(random_case(8, **{**COMPACT, "feature_map": "cluster", "n_clusters": 8}))
    q, k, v = as_mx(case)
    own = MLX.build_summary(k, v, case.cfg, queries=case.queries(mx.array))
    back = to_mlx_summary(to_numpy(own))
    assert back.estimate.labels.dtype == mx.int32 and back.pages.kappa.dtype == mx.float32
    out, _ = MLX.decode(q, k, v, own, case.cfg)
    again, _ = MLX.decode(q, k, v, back, case.cfg)
    np.testing.assert_array_equal(np.array(out), np.array(again))


@pytest.mark.parametrize("fields", [dict(feature_map="cluster", n_clusters=4),
                                    dict(selection="compact", feature_map="compact", page_size=4),
                                    dict(selection="compact", feature_map="cluster", page_size=4, n_clusters=4)])
def test_streaming_from_an_empty_prefill_mid_follows_the_oracle(fields):
    """A prefill whose mid is empty draws nothing at random: every cluster is seeded by fold-in and
    every compact page is fitted from tail mass, so each step must match the oracle's."""
    case = f32_case(random_case(1, n_tokens=60, d=16, n_sink=3, n_tail=5, top_k=8, **fields))
    _, k, v = as_mx(case)
    n0, rows = 6, case.ref_q[:, :, :4]
    ours = MLX.build_summary(k[:, :, :n0], v[:, :, :n0], case.cfg,
                             queries=ReferenceQueries(mx.array(rows.astype(np.float32)), end=n0))
    ref = ORACLE.build_summary(case.k[:, :, :n0], case.v[:, :, :n0], case.cfg, queries=ReferenceQueries(rows, n0))
    rng = np.random.default_rng(0)
    for n in range(n0, case.k.shape[2] + 1, 3):
        if n > n0:
            ours = MLX.append(ours, k[:, :, :n], v[:, :, :n], case.cfg)
            ref = ORACLE.append(ref, case.k[:, :, :n], case.v[:, :, :n], case.cfg)
        q = rng.standard_normal(case.q.shape).astype(np.float32)
        out, stats = MLX.decode(mx.array(q), k[:, :, :n], v[:, :, :n], ours, case.cfg)
        want, ref_stats = ORACLE.decode(q.astype(np.float64), case.k[:, :, :n], case.v[:, :, :n], ref, case.cfg,
                                        selected=np.array(stats.selected))
        assert rel_err(np.array(out), want) <= 1e-4, n
        np.testing.assert_allclose(np.array(stats.rho), ref_stats.rho, atol=1e-5)
    assert float(stats.rho.max().item()) > 0.01  # the estimator is in use at the end
