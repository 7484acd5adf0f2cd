"""Seeded random decode problems shared by every backend's tests (the parity matrix)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

import topkphi


@dataclass
class Case:
    q: np.ndarray  # [B, Hq, d] float64
    k: np.ndarray  # [B, Hkv, N, d]
    v: np.ndarray  # [B, Hkv, N, dv]
    cfg: topkphi.Config
    ref_q: np.ndarray  # [B, Hq, W, d]: the last W "prompt" rows the fitted summaries are fitted from

    def rounded(self, dtype) -> Case:
        """The same case with inputs rounded through ``dtype`` (e.g. ``np.float16``), still float64,
        so the oracle sees exactly what a low-precision backend sees."""
        names = ("q", "k", "v", "ref_q")
        return replace(self, **{n: getattr(self, n).astype(dtype).astype(np.float64) for n in names})

    def queries(self, convert=lambda x: x) -> topkphi.ReferenceQueries:
        """The reference queries, ending at the cache's end; ``convert`` makes them a backend's array."""
        return topkphi.ReferenceQueries(convert(self.ref_q), end=self.k.shape[2])


def learned_map(rng: np.random.Generator, n_kv: int, n_features: int, d: int) -> topkphi.FeatureMap:
    """A random but well-scaled exp-linear map standing in for a calibrated one."""
    w_q = rng.standard_normal((n_kv, n_features, d)) / np.sqrt(d)
    w_k = rng.standard_normal((n_kv, n_features, d)) / np.sqrt(d)
    bias = -0.5 * np.log(n_features)  # as in PRF, so phi(q) . phi(k) stays O(exp(s))
    return topkphi.FeatureMap.learned(w_q, bias + 0.1 * rng.standard_normal((n_kv, n_features)),
                                      w_k, bias + 0.1 * rng.standard_normal((n_kv, n_features)))


def random_case(
    seed: int,
    *,
    batch: int = 1,
    n_kv: int = 2,
    group: int = 2,
    n_tokens: int = 200,
    d: int = 32,
    dv: int | None = None,
    score_scale: float = 1.0,
    feature_map: str | None = "prf",
    **cfg_fields,
) -> Case:
    """Keys with a few hot spots so Top-K has something to find; ``score_scale`` stretches scores.

    ``feature_map="learned"`` draws a random learned map for the case's KV heads.
    """
    # a stream of its own: default_rng(seed) is the PRF draw of Config(seed=seed), and keys equal to
    # the omegas would dominate the summary far beyond float32's reach
    rng = np.random.default_rng([seed, 1])
    dv = d if dv is None else dv
    k = rng.standard_normal((batch, n_kv, n_tokens, d))
    q = rng.standard_normal((batch, n_kv * group, d))
    hot = rng.choice(n_tokens, size=max(1, n_tokens // 20), replace=False)
    k[:, :, hot] += 1.5 * q.reshape(batch, n_kv, group, d).mean(axis=2, keepdims=True)
    # reference rows near the decode queries, as the prompt's last rows are near the next query
    window = min(16, n_tokens)
    ref_q = q[:, :, None, :] + 0.7 * rng.standard_normal((batch, n_kv * group, window, d))
    q *= score_scale
    ref_q *= score_scale
    v = rng.standard_normal((batch, n_kv, n_tokens, dv))
    fmap = feature_map
    if feature_map == "learned":
        fmap = learned_map(rng, n_kv, cfg_fields.pop("n_features", 16), d)
    cfg_fields.setdefault("n_features", 16)
    cfg_fields.setdefault("selection", "exact")  # the matrix names every other selector it runs
    cfg = topkphi.Config(feature_map=fmap, **{"n_sink": 4, "n_tail": 16, "top_k": 32, **cfg_fields})
    return Case(q, k, v, cfg, ref_q)


def rel_err(out, ref) -> float:
    """``||out - ref|| / ||ref||``; the absolute error when ``ref`` is all zeros."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    scale = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / (scale if scale > 0 else 1.0))


# The matrix every backend runs: (name, random_case kwargs). Kept small enough for 2 CPU cores.
PARITY_MATRIX = [
    ("tiny-all-anchors", dict(n_tokens=12, n_kv=1, group=1, d=64)),
    ("mha-exact-prf", dict(n_tokens=257, n_kv=2, group=1, d=64)),
    ("gqa3-exact-prf", dict(n_tokens=333, n_kv=2, group=3, d=64, top_k=40)),
    ("gqa4-page-prf", dict(n_tokens=517, n_kv=2, group=4, d=128, selection="page", page_size=16, top_k=64)),
    ("gqa8-page-learned", dict(n_tokens=1031, n_kv=1, group=8, d=128, selection="page", page_size=8, top_k=96,
                               feature_map="learned", n_features=32)),
    ("gqa4-exact-learned", dict(n_tokens=700, n_kv=2, group=4, d=64, feature_map="learned", n_features=32)),
    ("topk-only-exact", dict(n_tokens=400, n_kv=2, group=4, d=64, feature_map=None)),
    ("topk-only-page", dict(n_tokens=400, n_kv=2, group=2, d=64, feature_map=None, selection="page")),
    ("batch2-page-small-pages", dict(batch=2, n_tokens=300, n_kv=2, group=2, d=64, selection="page", page_size=5,
                                     top_k=7, n_sink=3, n_tail=7)),
    ("k-covers-mid", dict(n_tokens=100, n_kv=2, group=2, d=64, top_k=1000)),
    ("large-scores", dict(n_tokens=300, n_kv=2, group=2, d=64, score_scale=30.0)),
    ("long-2k", dict(n_tokens=2500, n_kv=1, group=4, d=64, top_k=128, selection="page")),
    # fitted summaries (SPEC 8): every backend decodes the oracle's fit and fits its own
    ("gqa3-exact-cluster", dict(n_tokens=333, n_kv=2, group=3, d=64, top_k=40, feature_map="cluster", n_clusters=16)),
    ("gqa4-page-cluster", dict(n_tokens=517, n_kv=2, group=4, d=128, selection="page", top_k=64,
                               feature_map="cluster")),
    ("gqa4-compact-compact", dict(n_tokens=517, n_kv=2, group=4, d=64, selection="compact", page_size=16, top_k=64,
                                  feature_map="compact", n_sink=5)),
    ("gqa2-compact-cluster", dict(batch=2, n_tokens=300, n_kv=2, group=2, d=64, selection="compact", page_size=8,
                                  top_k=32, feature_map="cluster", n_clusters=8)),
    ("topk-only-compact", dict(n_tokens=400, n_kv=2, group=2, d=64, feature_map=None, selection="compact")),
    ("compact-covers-mid", dict(n_tokens=100, n_kv=1, group=2, d=32, selection="compact", page_size=8, top_k=1000,
                                feature_map="compact")),
]
