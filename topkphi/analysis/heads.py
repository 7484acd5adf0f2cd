"""Per-head metrics of decode-time attention: which heads need a large Top-K, and where phi helps.

Pure NumPy on captured arrays (``topkphi.capture.LayerCapture``); the float64 oracle computes
every approximate output, so the numbers are the method's, not a backend's.

    from topkphi.analysis.heads import inspect_layer, summarize
    rows = inspect_layer(capture, layer=0, positions=[N - 2, N - 1], cfg=topkphi.Config(top_k=64))
    summarize(rows)["share_high_entropy"]
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from topkphi.backends.numpy_backend import NumpyBackend
from topkphi.config import Config
from topkphi.reads import matched_top_k
from topkphi.regions import Regions, page_span
from topkphi.summary import ReferenceQueries, Summary, complete_pages

HIGH_ENTROPY = 0.5  # H / log N above this counts as a high-entropy head
_ORACLE = NumpyBackend()


@dataclass
class HeadReport:
    """One query head of one layer, averaged over the inspected decode steps."""

    layer: int
    q_head: int
    kv_head: int
    entropy: float  # H / log N of the dense attention
    sink_mass: float  # dense attention mass on the sink, tail and retrieved tokens (configured budget)
    tail_mass: float
    topk_mass: float
    dropped_mass: float  # 1 - the three above: what Top-K only loses
    rho: float  # the completion's estimated share of the unretrieved mass
    mid_mass_error: float | None  # |estimated / true unretrieved mass - 1|; None when nothing is unretrieved
    err_top_k: float  # ||out - dense|| / ||dense||, Top-K only at matched token-equivalent reads
    err_phi: float  # the same for Top-K + phi at the configured budget
    phi_gain: float  # (err_top_k - err_phi) / max of the two: > 0 phi helps, < 0 it hurts, in [-1, 1]
    suggested_top_k: int  # smallest budget keeping this head's dropped mass <= the limit at every step
    suggested_top_k_kv: int  # the same for the KV head (its query heads share one T)
    chosen_top_k_kv: float = 0.0  # mid tokens the configured policy read for the KV head, mean over steps
    delta_hat: float | None = None  # per-head budgets (SPEC 10): the policy's estimated dropped mass (KV head)
    delta_bar: float | None = None  # its certificate (certify=True)

    def as_dict(self) -> dict:
        return asdict(self)


# ---- metrics of one decode step (q [Hq, d], k [Hkv, N, d]) ----


def attention_probs(q: np.ndarray, k: np.ndarray, scale: float) -> np.ndarray:
    """Dense softmax ``p [Hq, N]`` of ``q [Hq, d]`` over ``k [Hkv, N, d]`` (GQA: head h reads h // G)."""
    n_q, n_kv = q.shape[0], k.shape[0]
    k_per_q = np.repeat(np.asarray(k, np.float64), n_q // n_kv, axis=0)
    scores = scale * np.einsum("hd,hnd->hn", np.asarray(q, np.float64), k_per_q)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def normalized_entropy(p: np.ndarray) -> np.ndarray:
    """``H(p) / log N`` along the last axis: 1 for uniform, 0 for one-hot (and for N = 1)."""
    n = p.shape[-1]
    if n < 2:
        return np.zeros(p.shape[:-1])
    logp = np.log(np.where(p > 0, p, 1.0))
    return -(p * logp).sum(axis=-1) / math.log(n)


def region_masses(p: np.ndarray, regions: Regions, selected: np.ndarray) -> dict[str, np.ndarray]:
    """Mass of ``p [Hq, N]`` on sink, tail and the retrieved ``selected [Hkv, T]`` (-1 padded), and the rest."""
    group = p.shape[0] // selected.shape[0]
    sink = p[:, : regions.sink_end].sum(axis=-1)
    tail = p[:, regions.mid_end :].sum(axis=-1)
    topk, dropped = np.zeros(p.shape[0]), np.zeros(p.shape[0])
    for h in range(p.shape[0]):
        chosen = selected[h // group]
        unread = np.zeros(p.shape[1], dtype=bool)
        unread[regions.mid_start : regions.mid_end] = True
        unread[chosen[chosen >= 0]] = False
        topk[h] = p[h, chosen[chosen >= 0]].sum()
        dropped[h] = p[h, unread].sum()  # summed, not 1 - the rest: exactly 0 when T covers mid
    return {"sink": sink, "tail": tail, "topk": topk, "dropped": dropped}


def mid_mass_error(rho: np.ndarray, dropped: np.ndarray) -> np.ndarray:
    """``|E / D - 1|``: E the completion's unnormalized estimate of the unretrieved mass, D the true one.

    Both share the exact part A (sink + tail + T): ``rho = E / (A + E)`` and ``dropped = D / (A + D)``,
    so ``E / D = (rho / (1 - rho)) / (dropped / (1 - dropped))``. NaN where nothing was dropped.
    """
    rho, dropped = np.asarray(rho, np.float64), np.asarray(dropped, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (rho / (1.0 - rho)) / (dropped / (1.0 - dropped))
    return np.where(dropped > 0, np.abs(ratio - 1.0), np.nan)


def relative_error(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``||out_h - ref_h|| / ||ref_h||`` per head (last axis is the value dimension)."""
    num = np.linalg.norm(out - ref, axis=-1)
    den = np.linalg.norm(ref, axis=-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), num)


def phi_gain(err_top_k: np.ndarray, err_phi: np.ndarray, exact: float = 1e-10) -> np.ndarray:
    """``(err_top_k - err_phi) / max(err_top_k, err_phi)``: 1 = phi removes the error, -1 = phi adds all of it.

    0 where both errors are below ``exact`` (both exact attention up to rounding).
    """
    err_top_k, err_phi = np.asarray(err_top_k, np.float64), np.asarray(err_phi, np.float64)
    worst = np.maximum(err_top_k, err_phi)
    return np.where(worst > exact, (err_top_k - err_phi) / np.where(worst > exact, worst, 1.0), 0.0)


def dropped_by_budget(q: np.ndarray, k: np.ndarray, p: np.ndarray, regions: Regions, cfg: Config, scale: float,
                      summary: Summary | None = None):
    """``(budgets [n], dropped [Hq, n])``: the dense mass ``p`` leaves out when Top-K takes ``budgets[i]``.

    Mid positions are ranked the way the configured selection ranks them (SPEC 3, 8.2): exact by the
    group's best score, page by the Quest bound, compact by the page tokens' scores (``summary``'s; the
    partial pages at the ends of mid are always read); page budgets are whole pages. ``budgets[0] = 0``.
    """
    n_q, n_kv = p.shape[0], k.shape[0]
    group = n_q // n_kv
    mid = np.arange(regions.mid_start, regions.mid_end)
    mid_mass = p[:, mid].sum(axis=-1)
    if regions.n_mid == 0:
        return np.zeros(1, dtype=np.int64), mid_mass[:, None]
    q64, k64 = np.asarray(q, np.float64).reshape(n_kv, group, -1), np.asarray(k, np.float64)
    size = cfg.page_size
    if cfg.selection == "exact":
        spans = [(j, j + 1) for j in mid]
        budgets = np.arange(regions.n_mid + 1)
    elif cfg.selection == "compact":
        first, n_pages = complete_pages(regions.mid_start, regions.mid_end, size)
        spans = [(i * size, (i + 1) * size) for i in range(first, first + n_pages)]
        mid_mass = np.stack([p[:, lo:hi].sum(axis=-1) for lo, hi in spans], axis=-1).sum(axis=-1) if spans \
            else np.zeros(n_q)
        budgets = size * np.arange(n_pages + 1)
    else:
        first, n_pages = page_span(regions.mid_start, regions.mid_end, size)
        spans = [(max(i * size, regions.mid_start), min((i + 1) * size, regions.mid_end))
                 for i in range(first, first + n_pages)]
        budgets = size * np.arange(n_pages + 1)
    if not spans:
        return np.zeros(1, dtype=np.int64), mid_mass[:, None]
    dropped = np.zeros((n_q, len(spans) + 1))
    for g in range(n_kv):
        heads = slice(g * group, (g + 1) * group)
        if cfg.selection == "exact":
            rank = (scale * q64[g] @ k64[g, mid].T).max(axis=0)
            mass = p[heads][:, mid]
        elif cfg.selection == "compact":
            pages = summary.pages
            rank = (scale * q64[g] @ pages.kappa[0, g].T + pages.beta[0, g]).max(axis=0)
            mass = np.stack([p[heads, lo:hi].sum(axis=-1) for lo, hi in spans], axis=-1)
        else:
            kmin = np.stack([k64[g, lo:hi].min(axis=0) for lo, hi in spans])
            kmax = np.stack([k64[g, lo:hi].max(axis=0) for lo, hi in spans])
            qg = q64[g][:, None, :]
            rank = (scale * np.maximum(qg * kmin[None], qg * kmax[None]).sum(-1)).max(axis=0)
            mass = np.stack([p[heads, lo:hi].sum(axis=-1) for lo, hi in spans], axis=-1)
        order = np.argsort(-rank, kind="stable")  # ties to the smaller index, as the oracle
        kept = np.concatenate([np.zeros((group, 1)), np.cumsum(mass[:, order], axis=-1)], axis=-1)
        dropped[heads] = mid_mass[heads, None] - kept
    return budgets, np.clip(dropped, 0.0, None)


def smallest_budget(budgets: np.ndarray, dropped: np.ndarray, limit: float) -> np.ndarray:
    """Per row of ``dropped [H, n]``, the smallest ``budgets[i]`` whose dropped mass is <= limit.

    At least ``budgets[1]`` (one token, or one page): a Top-K budget is never 0.
    """
    ok = dropped <= limit
    ok[:, -1] = True  # retrieving the whole mid drops nothing
    floor = budgets[1] if len(budgets) > 1 else 1
    return np.maximum(budgets[ok.argmax(axis=-1)], floor)


def inspect_step(q: np.ndarray, k: np.ndarray, v: np.ndarray, cfg: Config, max_dropped_mass: float,
                 ref_q: np.ndarray | None = None) -> dict:
    """Every metric of one decode step, per query head: ``q [Hq, d]``, ``k [Hkv, N, d]``, ``v [Hkv, N, dv]``.

    ``cfg.scale`` must be the model's scale. The Top-K-only baseline gets ``matched_top_k`` tokens and
    the same selector. Fitted summaries (SPEC 8) are fitted from ``ref_q [Hq, W, d]``, the query rows of
    the W positions before this step's (earlier positions only: the fit never sees the scored query).
    """
    n_q, d = q.shape
    n_kv, n_tokens, dv = v.shape
    if cfg.feature_map is None:
        raise ValueError("inspect-heads compares Top-K + phi with Top-K only: it needs a feature map")
    scale = cfg.tau(d)
    regions = Regions.of(n_tokens, cfg.n_sink, cfg.n_tail)
    q3, k4, v4 = np.asarray(q, np.float64)[None], np.asarray(k, np.float64)[None], np.asarray(v, np.float64)[None]
    ref = _ORACLE.dense(q3, k4, v4, scale)[0]
    queries = None
    if ref_q is not None and ref_q.shape[1] > 0:
        queries = ReferenceQueries(np.asarray(ref_q, np.float64)[None], end=n_tokens - 1)
    summary = _ORACLE.build_summary(k4, v4, cfg, queries=queries)
    out_phi, stats = _ORACLE.decode(q3, k4, v4, summary, cfg)
    base = cfg.replace(feature_map=None, top_k=matched_top_k(cfg, d, dv))
    base_summary = _ORACLE.build_summary(k4, v4, base, queries=queries)
    out_top_k, _ = _ORACLE.decode(q3, k4, v4, base_summary, base)

    p = attention_probs(q, k, scale)
    masses = region_masses(p, regions, np.asarray(stats.selected)[0])
    rho = np.asarray(stats.rho, np.float64)[0]
    budgets, dropped = dropped_by_budget(q, k, p, regions, cfg, scale, summary)
    own = smallest_budget(budgets, dropped, max_dropped_mass)
    group = n_q // n_kv
    per_kv = np.repeat(own.reshape(n_kv, group).max(axis=1), group)
    err_top_k, err_phi = relative_error(out_top_k[0], ref), relative_error(out_phi[0], ref)
    budget = stats.budget
    per_q = lambda x: np.repeat(np.asarray(x, np.float64)[0], group)  # noqa: E731  [1, Hkv] -> [Hq]
    nan = np.full(n_q, np.nan)
    return {
        "chosen_top_k_kv": per_q(stats.n_selected),
        "delta_hat": nan if budget is None else per_q(budget.delta_hat),
        "delta_bar": nan if budget is None or budget.delta_bar is None else per_q(budget.delta_bar),
        "entropy": normalized_entropy(p),
        "sink_mass": masses["sink"],
        "tail_mass": masses["tail"],
        "topk_mass": masses["topk"],
        "dropped_mass": masses["dropped"],
        "rho": rho,
        "mid_mass_error": mid_mass_error(rho, masses["dropped"]),
        "err_top_k": err_top_k,
        "err_phi": err_phi,
        "suggested_top_k": own,
        "suggested_top_k_kv": per_kv,
    }


def inspect_layer(capture, layer: int, positions: list[int], cfg: Config, max_dropped_mass: float = 0.05
                  ) -> list[HeadReport]:
    """One report per query head of ``capture`` (a ``LayerCapture``), averaged over the decode steps at
    ``positions``; the suggested budgets are the largest over the steps. Fitted summaries are fitted
    from up to ``cfg.fit_window`` captured query rows before each position (capture that many more)."""
    cfg = cfg.replace(scale=capture.scale)
    steps = []
    first_row = capture.k.shape[2] - capture.q.shape[2]  # absolute position of capture.q[:, :, 0]
    for position in positions:
        q, k, v = capture.decode_step(position)
        lo = max(first_row, position - cfg.fit_window)
        ref_q = capture.q[0, :, lo - first_row: position - first_row] if cfg.fitted else None
        steps.append(inspect_step(q[0], k[0], v[0], cfg, max_dropped_mass, ref_q))
    n_q, n_kv = capture.q.shape[1], capture.k.shape[1]
    mean = {name: np.mean([s[name] for s in steps], axis=0) for name in steps[0]}
    suggested = {name: np.max([s[name] for s in steps], axis=0) for name in ("suggested_top_k", "suggested_top_k_kv")}
    with warnings.catch_warnings():  # heads that never dropped anything have no mid-mass error
        warnings.simplefilter("ignore", RuntimeWarning)
        mid_error = np.nanmean(np.stack([s["mid_mass_error"] for s in steps]), axis=0)
    gain = phi_gain(mean["err_top_k"], mean["err_phi"])
    return [
        HeadReport(
            layer=layer, q_head=h, kv_head=h // (n_q // n_kv),
            entropy=float(mean["entropy"][h]), sink_mass=float(mean["sink_mass"][h]),
            tail_mass=float(mean["tail_mass"][h]), topk_mass=float(mean["topk_mass"][h]),
            dropped_mass=float(mean["dropped_mass"][h]), rho=float(mean["rho"][h]),
            mid_mass_error=None if not np.isfinite(mid_error[h]) else float(mid_error[h]),
            err_top_k=float(mean["err_top_k"][h]), err_phi=float(mean["err_phi"][h]), phi_gain=float(gain[h]),
            suggested_top_k=int(suggested["suggested_top_k"][h]),
            suggested_top_k_kv=int(suggested["suggested_top_k_kv"][h]),
            chosen_top_k_kv=float(mean["chosen_top_k_kv"][h]), delta_hat=_finite(mean["delta_hat"][h]),
            delta_bar=_finite(mean["delta_bar"][h]),
        )
        for h in range(n_q)
    ]


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def pearson(x, y) -> float | None:
    """Pearson correlation, or None when either side is constant (or fewer than two points)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def summarize(rows: list[HeadReport], high_entropy: float = HIGH_ENTROPY) -> dict:
    """The few numbers a user reads first: how many heads are diffuse, and where phi helps or hurts."""
    entropy = np.array([r.entropy for r in rows])
    gain = np.array([r.phi_gain for r in rows])
    high = entropy > high_entropy

    def mean_gain(mask) -> float | None:
        return float(gain[mask].mean()) if mask.any() else None

    return {
        "n_heads": len(rows),
        "high_entropy_threshold": high_entropy,
        "share_high_entropy": float(high.mean()) if rows else 0.0,
        "phi_helps": int((gain > 0).sum()),
        "phi_hurts": int((gain < 0).sum()),
        "phi_neutral": int((gain == 0).sum()),
        "mean_gain_high_entropy": mean_gain(high),
        "mean_gain_low_entropy": mean_gain(~high),
        "entropy_gain_correlation": pearson(entropy, gain),
        "mean_err_top_k": float(np.mean([r.err_top_k for r in rows])) if rows else 0.0,
        "mean_err_phi": float(np.mean([r.err_phi for r in rows])) if rows else 0.0,
        "mean_dropped_mass": float(np.mean([r.dropped_mass for r in rows])) if rows else 0.0,
        "max_suggested_top_k": max((r.suggested_top_k_kv for r in rows), default=0),
        # the policy's reads against the suggestion (per query head rows, so KV heads weigh by their group)
        "mean_suggested_top_k_kv": float(np.mean([r.suggested_top_k_kv for r in rows])) if rows else 0.0,
        "mean_chosen_top_k_kv": float(np.mean([r.chosen_top_k_kv for r in rows])) if rows else 0.0,
        "share_chosen_below_suggested": float(np.mean([r.chosen_top_k_kv < r.suggested_top_k_kv for r in rows]))
        if rows else 0.0,
    }
