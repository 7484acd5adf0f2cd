"""The float64 NumPy oracle: the SPEC written out plainly. Every other backend is tested against it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from topkphi.backends.base import DecodeStats
from topkphi.config import Config, check_shapes
from topkphi.feature_maps import FeatureMap
from topkphi.reads import read_counts
from topkphi.regions import Regions, n_selected_pages, n_selected_tokens, page_span
from topkphi.summary import Summary, check_compatible, fold_range


def features(x: np.ndarray, fmap: FeatureMap, side: str, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """``(f [B,H,n,m], c [B,H,n])`` for ``x [B,H,n,d]`` with ``phi(x) = exp(c) * f`` (SPEC section 4)."""
    x_tilde = np.sqrt(tau) * x
    if fmap.kind == "taylor2":
        outer = np.einsum("...i,...j->...ij", x_tilde, x_tilde).reshape(*x.shape[:-1], -1) / np.sqrt(2.0)
        f = np.concatenate([np.ones((*x.shape[:-1], 1)), x_tilde, outer], axis=-1)
        return f, np.zeros(x.shape[:-1])
    w, b = (fmap.w_q, fmap.b_q) if side == "q" else (fmap.w_k, fmap.b_k)
    logits = np.einsum("bhnd,hmd->bhnm", x_tilde, np.asarray(w, np.float64)) + np.asarray(b, np.float64)[None, :, None]
    logits -= fmap.norm_coef * 0.5 * np.sum(x_tilde * x_tilde, axis=-1, keepdims=True)
    c = logits.max(axis=-1)
    return np.exp(logits - c[..., None]), c


def _as64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


class NumpyBackend:
    """Reference implementation in float64; slow and exact by construction."""

    name = "numpy"

    def build_summary(self, k, v, cfg: Config) -> Summary:
        batch, n_kv, _, d = check_shapes(None, k, v)[0], k.shape[1], k.shape[2], k.shape[3]
        dv = v.shape[3]
        fmap = cfg.feature_map_for(d)
        empty = Summary(n_tokens=0, mid_start=cfg.n_sink, mid_end=cfg.n_sink, first_page=cfg.n_sink // cfg.page_size)
        if fmap is not None:
            fmap.check_heads(n_kv)
            m = fmap.n_features
            empty.s = np.zeros((batch, n_kv, m, dv))
            empty.z = np.zeros((batch, n_kv, m))
            empty.c_max = np.full((batch, n_kv), -np.inf)
        if cfg.selection == "page":
            empty.kmin = np.zeros((batch, n_kv, 0, d))
            empty.kmax = np.zeros((batch, n_kv, 0, d))
        return self.append(empty, k, v, cfg)

    def append(self, summary: Summary, k, v, cfg: Config) -> Summary:
        check_shapes(None, k, v)
        n_tokens = k.shape[2]
        lo, hi = fold_range(summary, cfg, n_tokens)
        out = replace(summary, n_tokens=n_tokens, mid_end=hi)
        if hi == lo:
            return out
        k_new, v_new = _as64(k[:, :, lo:hi]), _as64(v[:, :, lo:hi])
        fmap = cfg.feature_map_for(k.shape[3])
        if fmap is not None:
            f, c = features(k_new, fmap, "k", cfg.tau(k.shape[3]))
            c_new = np.maximum(summary.c_max, c.max(axis=-1))
            # exp(-inf) = 0 clears the empty state; c_new is finite once a token is folded
            rescale = np.exp(summary.c_max - c_new)
            w = np.exp(c - c_new[..., None])[..., None] * f
            out.s = summary.s * rescale[..., None, None] + np.einsum("bhnm,bhnv->bhmv", w, v_new)
            out.z = summary.z * rescale[..., None] + w.sum(axis=2)
            out.c_max = c_new
        if summary.kmin is not None:
            out.kmin, out.kmax = _update_pages(summary, _as64(k), lo, hi, cfg.page_size)
        return out

    def decode(self, q, k, v, summary: Summary, cfg: Config, selected=None):
        """``selected [B,Hkv,T]`` (-1 padded) replaces the oracle's own selection: parity tests feed
        another backend's ``T`` here, since near-ties may legitimately order differently in low precision."""
        dims = check_shapes(q, k, v)
        batch, n_q, n_kv, n_tokens, d, dv = dims
        group = dims.group
        check_compatible(summary, cfg, n_tokens)
        fmap = cfg.feature_map_for(d)
        if fmap is not None:
            fmap.check_heads(n_kv)
        tau = cfg.tau(d)
        regions = Regions.of(n_tokens, cfg.n_sink, cfg.n_tail)
        q64 = _as64(q).reshape(batch, n_kv, group, d)
        k64, v64 = _as64(k), _as64(v)

        if selected is None:
            selected = [[self._select(q64[b, g], k64[b, g], summary, regions, cfg, tau, b, g) for g in range(n_kv)]
                        for b in range(batch)]
        else:
            given = np.asarray(selected, dtype=np.int64)
            selected = [[np.sort(given[b, g][given[b, g] >= 0]) for g in range(n_kv)] for b in range(batch)]
        uses_summary = fmap is not None and regions.n_mid > 0
        f_q = c_q = None
        if uses_summary:
            f_q, c_q = features(q64, fmap, "q", tau)

        out = np.zeros((batch, n_kv, group, dv))
        rho = np.zeros((batch, n_kv, group))
        width = max((len(t) for row in selected for t in row), default=0)
        sel = np.full((batch, n_kv, width), -1, dtype=np.int64)
        n_sel = np.zeros((batch, n_kv), dtype=np.int64)
        n_read = np.zeros((batch, n_kv), dtype=np.int64)
        reads = np.zeros((batch, n_kv))
        for b in range(batch):
            for g in range(n_kv):
                chosen = selected[b][g]
                sel[b, g, : len(chosen)] = chosen
                n_sel[b, g] = len(chosen)
                read_set = np.concatenate(
                    [np.arange(regions.sink_end), chosen, np.arange(regions.mid_end, n_tokens)]
                ).astype(np.int64)
                n_read[b, g] = len(read_set)
                # a Top-K that covers the whole mid is exact attention: the summary is not read
                complete = uses_summary and len(chosen) < regions.n_mid
                phi = None
                if complete:
                    phi = (f_q[b, g], c_q[b, g], summary, fmap, chosen)
                out[b, g], rho[b, g] = self._attend(q64[b, g], k64[b, g], v64[b, g], read_set, tau, phi, b, g)
                reads[b, g] = read_counts(cfg, len(read_set), regions.n_mid, complete, fmap, d, dv).total
        stats = DecodeStats(
            rho=rho.reshape(batch, n_q),
            selected=sel,
            n_selected=n_sel,
            tokens_read=n_read,
            token_equivalents=reads,
            n_tokens=n_tokens,
        )
        return out.reshape(batch, n_q, dv), stats

    def dense(self, q, k, v, scale: float | None = None) -> np.ndarray:
        batch, n_q, n_kv, _, d, dv = check_shapes(q, k, v)
        tau = scale if scale is not None else d**-0.5
        q64 = _as64(q).reshape(batch, n_kv, n_q // n_kv, d)
        scores = tau * np.einsum("bhgd,bhnd->bhgn", q64, _as64(k))
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        out = np.einsum("bhgn,bhnv->bhgv", p, _as64(v)) / p.sum(axis=-1)[..., None]
        return out.reshape(batch, n_q, dv)

    @staticmethod
    def _select(q_group, k_head, summary: Summary, regions: Regions, cfg: Config, tau: float, b: int, g: int):
        """Retrieved mid positions ``T`` (ascending) shared by the group's query heads (SPEC section 3)."""
        if regions.n_mid == 0:
            return np.zeros(0, dtype=np.int64)
        if cfg.selection == "exact":
            mid = np.arange(regions.mid_start, regions.mid_end)
            best = (tau * q_group @ k_head[mid].T).max(axis=0)
            order = np.argsort(-best, kind="stable")[: n_selected_tokens(cfg.top_k, regions.n_mid)]
            return np.sort(mid[order])
        kmin, kmax = summary.kmin[b, g], summary.kmax[b, g]  # [n_pages, d]
        bound = tau * np.maximum(q_group[:, None, :] * kmin[None], q_group[:, None, :] * kmax[None]).sum(-1)
        n_take = n_selected_pages(cfg.top_k, cfg.page_size, summary.n_pages)
        pages = summary.first_page + np.sort(np.argsort(-bound.max(axis=0), kind="stable")[:n_take])
        size = cfg.page_size
        spans = [np.arange(max(p * size, regions.mid_start), min((p + 1) * size, regions.mid_end)) for p in pages]
        return np.concatenate(spans).astype(np.int64)

    @staticmethod
    def _attend(q_group, k_head, v_head, read_set, tau, phi, b, g):
        """Exact part over the read set plus the phi estimate of the rest, normalized once (SPEC section 5)."""
        scores = tau * q_group @ k_head[read_set].T  # [G, |A|]
        v_read = v_head[read_set]
        group = q_group.shape[0]
        lam = np.full(group, -np.inf)
        n_phi = np.zeros((group, v_head.shape[1]))
        d_phi = np.zeros(group)
        if phi is not None:
            f_q, c_q, summary, fmap, chosen = phi
            c_big = summary.c_max[b, g]
            f_k, c_k = features(k_head[chosen][None, None], _head_slice(fmap, g), "k", tau)
            w_t = np.exp(c_k[0, 0] - c_big)[:, None] * f_k[0, 0]  # [|T|, m], as folded into S, z
            share = f_q @ w_t.T  # [G, |T|]: the retrieved tokens' estimated share
            n_phi = f_q @ summary.s[b, g] - share @ v_head[chosen]
            d_phi = f_q @ summary.z[b, g] - share.sum(axis=1)
            lam = c_q + c_big
            keep = d_phi > 0  # never negative mass
            n_phi = np.where(keep[:, None], n_phi, 0.0)
            d_phi = np.where(keep, d_phi, 0.0)
        phi_log = np.where(d_phi > 0, lam + np.log(np.where(d_phi > 0, d_phi, 1.0)), -np.inf)
        m_star = np.maximum(scores.max(axis=1), phi_log)
        p = np.exp(scores - m_star[:, None])
        w_phi = np.where(d_phi > 0, np.exp(np.where(d_phi > 0, lam - m_star, -np.inf)), 0.0)
        num = p @ v_read + w_phi[:, None] * n_phi
        den = p.sum(axis=1) + w_phi * d_phi
        return num / den[:, None], w_phi * d_phi / den


def _head_slice(fmap: FeatureMap, g: int) -> FeatureMap:
    """The one-KV-head view of ``fmap`` (its parameters may be shared by all heads)."""
    if not fmap.exp_linear:
        return fmap
    h = 0 if fmap.n_param_heads == 1 else g
    return FeatureMap(fmap.kind, fmap.d, fmap.w_q[h : h + 1], fmap.b_q[h : h + 1], fmap.w_k[h : h + 1],
                      fmap.b_k[h : h + 1], fmap.norm_coef)



def _update_pages(summary: Summary, k64: np.ndarray, lo: int, hi: int, page_size: int):
    """kmin/kmax of every page touched by the newly folded positions ``[lo, hi)``."""
    first, n_pages = page_span(summary.mid_start, hi, page_size)
    batch, n_kv, _, d = k64.shape
    kmin = np.zeros((batch, n_kv, n_pages, d))
    kmax = np.zeros((batch, n_kv, n_pages, d))
    kept = summary.n_pages
    kmin[:, :, :kept], kmax[:, :, :kept] = summary.kmin, summary.kmax
    for p in range(max(lo // page_size, first), first + n_pages):
        keys = k64[:, :, max(p * page_size, summary.mid_start) : min((p + 1) * page_size, hi)]
        kmin[:, :, p - first], kmax[:, :, p - first] = keys.min(axis=2), keys.max(axis=2)
    return kmin, kmax
