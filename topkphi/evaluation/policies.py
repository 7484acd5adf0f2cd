"""Decode policies at matched token-equivalent reads per decode step (SPEC section 6).

Every method reads the same token-equivalents per KV head per decode step at a budget ``B``:

- ``topk+phi``: sink + tail + Top-K (``top_k = B``) exact, plus the estimator, plus selection reads;
- ``topk``: the same with no estimator, its share given back as retrieved tokens (``matched_top_k``);
- ``sink-tail`` (StreamingLLM-style): no retrieval, no selection; sink + a longer tail holding all of
  topk+phi's reads (exact + estimator + selection, at the sample's length). ``Config`` needs
  ``top_k >= 1``, so no ``Config`` alone says "no retrieval": the policy names its decode,
  ``SinkTailDecode`` (exact attention over sink + tail only, through the same caches);
- ``dense``: the whole cache, always run (the model's own ceiling).

With learned maps (one calibrated ``FeatureMap`` per layer, from a phi file) topk+phi's summary share
includes each map's query-side parameters (SPEC section 6), so ``topk`` and ``sink-tail`` get
correspondingly more; every layer gets its own map, and the matched reads are computed per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from topkphi.config import Config
from topkphi.reads import estimator_reads, matched_top_k, selection_reads

METHODS = ("dense", "sink-tail", "topk", "topk+phi")


@dataclass(frozen=True)
class Policy:
    method: str
    budget: int | None  # None for dense
    cfg: Config | None  # None for dense; layer 0's config when the layers differ
    planned_reads: float  # token-equivalents per KV head per decode step at the sample's length (layer mean)
    layer_cfgs: tuple[Config, ...] | None = None  # one per layer (learned maps); None: ``cfg`` everywhere

    @property
    def label(self) -> str:
        return self.method if self.budget is None else f"{self.method}@{self.budget}"

    def config(self, layer: int) -> Config | None:
        return self.cfg if self.layer_cfgs is None else self.layer_cfgs[layer]

    @property
    def engine_cfg(self):
        """What the generation engines take: one ``Config`` (or None: dense) or ``layer_idx -> Config``."""
        return self.cfg if self.layer_cfgs is None else self.config

    def decode_backend(self, kernel):
        """The decode this policy runs on ``kernel`` (None for dense): sink-tail attends to sink + tail only."""
        if self.cfg is None:
            return None
        return SinkTailDecode(kernel) if self.method == "sink-tail" else kernel

    def knobs(self) -> dict:
        """The budgets a table shows: top_k (None for sink-tail and dense) and n_tail."""
        if self.cfg is None:
            return {"top_k": None, "n_tail": None}
        return {"top_k": None if self.method == "sink-tail" else self.cfg.top_k, "n_tail": self.cfg.n_tail}


def policy(method: str, budget: int | None, base: Config, n_tokens: int, d: int, dv: int,
           maps: list | None = None) -> Policy:
    """``method`` at budget ``budget`` for a context of ``n_tokens``, matched to topk+phi's reads.

    ``maps``: one learned ``FeatureMap`` per layer; each layer's topk+phi uses its map, and the other methods
    are matched to that layer's reads (its summary includes the map's query-side parameters)."""
    if maps is None or method == "dense":
        return _policy(method, budget, base, n_tokens, d, dv)
    per_layer = [_policy(method, budget, base.replace(feature_map=fmap, n_features=fmap.n_features), n_tokens, d, dv)
                 for fmap in maps]
    cfgs = tuple(p.cfg for p in per_layer)
    planned = float(np.mean([p.planned_reads for p in per_layer]))
    if method != "topk+phi" and all(c == cfgs[0] for c in cfgs):  # no map in them: one config serves every layer
        return Policy(method, budget, cfgs[0], planned)
    return Policy(method, budget, cfgs[0], planned, cfgs)


def _policy(method: str, budget: int | None, base: Config, n_tokens: int, d: int, dv: int) -> Policy:
    if method == "dense":
        return Policy("dense", None, None, float(n_tokens))
    phi = base.replace(top_k=budget)
    n_mid = max(0, n_tokens - base.n_sink - base.n_tail)
    retrieved = min(budget, n_mid)
    total = base.n_sink + base.n_tail + retrieved + estimator_reads(phi, retrieved, d, dv)
    total += selection_reads(phi, n_mid, d, dv)
    if method == "topk+phi":
        return Policy(method, budget, phi, total)
    if method == "topk":
        top_only = phi.replace(feature_map=None, top_k=matched_top_k(phi, d, dv))
        return Policy(method, budget, top_only, total)
    if method == "sink-tail":
        n_tail = max(base.n_tail, math.ceil(total) - base.n_sink)
        # no retrieval: a per-head budget (SPEC 10) has nothing to spread
        cfg = base.replace(feature_map=None, top_k=1, n_tail=n_tail, budget="fixed", min_top_k=0, certify=False)
        return Policy(method, budget, cfg, float(base.n_sink + n_tail))
    raise ValueError(f"unknown method {method!r}; expected some of {', '.join(METHODS)}")


def covers_mid(base: Config, budget: int, n_tokens: int) -> bool:
    """A budget that takes the whole mid of ``n_tokens``: every method is exact attention there."""
    return budget >= n_tokens - base.n_sink - base.n_tail


# ---------------------------------------------------------------- the sink-tail policy's decode


class SinkTailDecode:
    """The decode of ``sink-tail``; ``inner`` (torch, triton, mlx or the numpy oracle) does the attention."""

    def __init__(self, inner) -> None:
        self.inner, self.name = inner, f"sink-tail({inner.name})"

    def build_summary(self, k, v, cfg: Config, queries=None):
        return None

    def append(self, summary, k, v, cfg: Config):
        return None

    def dense(self, q, k, v, scale=None):
        return self.inner.dense(q, k, v, scale)

    def decode(self, q, k, v, summary, cfg: Config, selected=None):
        """``q [B,Hq,d]`` over ``k, v [B,Hkv,N,d]``: the first ``n_sink`` and last ``n_tail`` tokens (``selected``,
        a given read set in the backends' protocol, has no meaning without retrieval)."""
        n = k.shape[2]
        if n > cfg.n_sink + cfg.n_tail:
            k, v = (_cat(x[:, :, : cfg.n_sink], x[:, :, n - cfg.n_tail :]) for x in (k, v))
        out = self.inner.dense(q, k, v, cfg.tau(q.shape[-1]))
        read = float(k.shape[2])
        batch, n_q, n_kv = q.shape[0], q.shape[1], k.shape[1]
        stats = SinkTailStats(rho=_full(q, (batch, n_q), 0.0), selected=_full(q, (batch, n_kv, 0), 0),
                              n_selected=_full(q, (batch, n_kv), 0), tokens_read=_full(q, (batch, n_kv), read),
                              token_equivalents=_full(q, (batch, n_kv), read), n_tokens=n)
        return out, stats


@dataclass
class SinkTailStats:
    """What a decode step reports (``topkphi.step.DecodeStats``'s fields), for a step with no plan: no
    selection, no estimate; arrays in the inputs' framework."""

    rho: Any  # [B, Hq] zeros
    selected: Any  # [B, Hkv, 0]
    n_selected: Any  # [B, Hkv] zeros
    tokens_read: Any  # [B, Hkv] n_sink + n_tail (or N when shorter)
    token_equivalents: Any  # the same: nothing but exact tokens is read
    n_tokens: int
    budget: None = None  # no per-head budget (SPEC 10): nothing is retrieved

    def read_fraction(self) -> float:
        mean = self.token_equivalents.mean()
        return float(mean.item() if hasattr(mean, "item") else mean) / self.n_tokens


# the arrays' own framework (the caches sum the stats on the device): NumPy, torch or MLX
def _cat(first, last):
    if isinstance(first, np.ndarray):
        return np.concatenate([first, last], axis=2)
    if type(first).__module__.startswith("torch"):
        import torch

        return torch.cat([first, last], dim=2)
    import mlx.core as mx

    return mx.concatenate([first, last], axis=2)


def _full(like, shape, value):
    """float32 (float64 for NumPy) like the backends' stats."""
    if isinstance(like, np.ndarray):
        return np.full(shape, value, dtype=np.float64)
    if type(like).__module__.startswith("torch"):
        import torch

        return torch.full(shape, value, dtype=torch.float32, device=like.device)
    import mlx.core as mx

    return mx.full(shape, value, dtype=mx.float32)
