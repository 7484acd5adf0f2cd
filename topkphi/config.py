"""The user's knobs, validated once, and the shape contract of a decode call (SPEC section 1)."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from topkphi.feature_maps import FEATURE_MAP_KINDS, FeatureMap

SELECTIONS = ("exact", "page", "compact")
# fitted summaries (SPEC 8): estimators fitted in closed form at prefill, not feature maps
FITTED_ESTIMATORS = ("cluster", "compact")
ESTIMATORS = (*FEATURE_MAP_KINDS, *FITTED_ESTIMATORS)
# feature_map's default follows the selector: the compact tokens' own estimate for compact selection;
# Top-K only for page and exact (PRF measured worse than spending its reads on Top-K; clusters need
# reference queries, which a caller of the raw API may not have: ask for them by name)
DEFAULT_ESTIMATOR = "default"
# SPEC 10: "fixed" takes top_k per KV head; "mass" takes units (tokens or pages) in score order until
# the estimated dropped fraction is <= max_dropped_mass (top_k the cap, min_top_k the floor);
# "marginal" spreads a layer's total of top_k per head over its heads by the estimated gain of one
# more unit (min_top_k the floor)
BUDGETS = ("fixed", "mass", "marginal")


class Dims(NamedTuple):
    batch: int
    n_q_heads: int
    n_kv_heads: int
    n_tokens: int
    d: int
    dv: int

    @property
    def group(self) -> int:
        return self.n_q_heads // self.n_kv_heads


@dataclass(frozen=True)
class Config:
    """Budgets and maps of one decode policy.

    ``feature_map`` names the estimator of the unread mid (SPEC 4, 8): a feature map
    (``prf``, ``taylor2``, a learned ``FeatureMap``), the clustered summary ``cluster``, or
    ``compact`` (the page tokens of ``selection="compact"``); ``None`` is the Top-K-only baseline.
    ``n_clusters`` and ``fit_window`` size the fitted summaries (SPEC 8).
    """

    n_sink: int = 4
    n_tail: int = 64
    top_k: int = 256
    # the best measured deployable pair (docs/RESULTS.md, "Fitted summaries"): compact page tokens
    # select the pages and estimate the unread ones; PRF, taylor2, learned and clusters stay options
    selection: str = "compact"
    page_size: int = 16
    feature_map: str | FeatureMap | None = DEFAULT_ESTIMATOR
    n_features: int = 64
    seed: int = 0
    scale: float | None = None
    n_clusters: int = 32
    fit_window: int = 256
    # fixed stays the default: the measured comparison at equal mean reads is in docs/RESULTS.md
    budget: str = "fixed"
    max_dropped_mass: float = 0.05
    min_top_k: int = 0
    certify: bool = False

    def __post_init__(self) -> None:
        for name in ("n_sink", "n_tail", "top_k", "page_size", "n_features", "seed", "n_clusters", "fit_window",
                     "min_top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("n_sink", "n_tail"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k} (use a dense baseline for no retrieval)")
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {self.n_features}")
        if self.n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {self.n_clusters}")
        if self.fit_window < 1:
            raise ValueError(f"fit_window must be >= 1, got {self.fit_window}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown selection {self.selection!r}; expected one of {SELECTIONS}")
        self._check_budget()
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {self.scale!r}")
        if self.feature_map == DEFAULT_ESTIMATOR:
            object.__setattr__(self, "feature_map", "compact" if self.selection == "compact" else None)
        fmap = self.feature_map
        if isinstance(fmap, str):
            if fmap not in ESTIMATORS:
                raise ValueError(f"unknown feature map {fmap!r}; expected one of {ESTIMATORS} or None")
            if fmap == "compact" and self.selection != "compact":
                raise ValueError("feature_map='compact' estimates from the compact page tokens: "
                                 "it needs selection='compact'")
            if fmap == "learned":
                raise ValueError(
                    "feature_map='learned' needs calibrated parameters: pass FeatureMap.learned(...) "
                    "or a map loaded from a phi file"
                )
        elif fmap is not None and not isinstance(fmap, FeatureMap):
            raise ValueError(f"feature_map must be a name, a FeatureMap or None, got {type(fmap).__name__}")

    def _check_budget(self) -> None:
        if self.budget not in BUDGETS:
            raise ValueError(f"unknown budget {self.budget!r}; expected one of {BUDGETS}")
        delta = self.max_dropped_mass
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            raise ValueError(f"max_dropped_mass must lie strictly between 0 and 1, got {delta!r}")
        if not 0 <= self.min_top_k <= self.top_k:
            raise ValueError(f"min_top_k (the floor) must lie in [0, top_k={self.top_k}], got {self.min_top_k}")
        if not isinstance(self.certify, bool):
            raise ValueError(f"certify must be True or False, got {self.certify!r}")
        if self.certify and self.budget != "mass":
            raise ValueError("certify=True certifies a dropped-mass budget: it needs budget='mass'")
        if self.certify and self.selection == "compact":
            raise ValueError("certify=True needs an upper bound on each unread unit's mass: selection='page' "
                             "(the Quest bound) or 'exact' (exact scores); compact tokens only estimate it")

    def replace(self, **changes) -> Config:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def completion(self) -> bool:
        return self.feature_map is not None

    @property
    def estimator(self) -> str | None:
        """``None``, ``"feature_map"`` (prf, taylor2, learned), ``"cluster"`` or ``"compact"``."""
        fmap = self.feature_map
        if fmap is None:
            return None
        return fmap if fmap in FITTED_ESTIMATORS else "feature_map"

    @property
    def fitted(self) -> bool:
        """The summary is fitted from reference queries at prefill (SPEC 8)."""
        return self.estimator in FITTED_ESTIMATORS or self.selection == "compact"

    def tau(self, d: int) -> float:
        return self.scale if self.scale is not None else d**-0.5

    def feature_map_for(self, d: int) -> FeatureMap | None:
        """The map this config uses for head dimension ``d`` (drawn once, then cached)."""
        fmap = self.feature_map
        if fmap in FITTED_ESTIMATORS:
            return None
        if fmap is None or isinstance(fmap, FeatureMap):
            if fmap is not None and fmap.d != d:
                raise ValueError(f"feature map was built for d={fmap.d}, the cache has d={d}")
            return fmap
        return _named_feature_map(fmap, d, self.n_features, self.seed)

    def check_shapes(self, q: Any, k: Any, v: Any) -> Dims:
        """Validate ``q [B,Hq,d]``, ``k [B,Hkv,N,d]``, ``v [B,Hkv,N,dv]`` and return their sizes."""
        return check_shapes(q, k, v)


def check_shapes(q: Any, k: Any, v: Any | None = None) -> Dims:
    k_shape = tuple(k.shape)
    v_shape = tuple(v.shape) if v is not None else k_shape
    if len(k_shape) != 4 or len(v_shape) != 4:
        raise ValueError(f"k and v must be [B, Hkv, N, d]; got k {k_shape}, v {v_shape}")
    batch, n_kv, n_tokens, d = k_shape
    if v_shape[:3] != (batch, n_kv, n_tokens):
        raise ValueError(f"v {v_shape} does not match k {k_shape} in [B, Hkv, N]")
    if q is not None:
        q_shape = tuple(q.shape)
        if len(q_shape) != 3 or q_shape[0] != batch or q_shape[2] != d:
            raise ValueError(f"q must be [B, Hq, d] = [{batch}, Hq, {d}]; got {q_shape}")
        n_q = q_shape[1]
        if n_kv == 0 or n_q % n_kv != 0:
            raise ValueError(f"query heads ({n_q}) must be a multiple of KV heads ({n_kv})")
    else:
        n_q = n_kv
    if n_tokens < 1:
        raise ValueError("the KV cache is empty")
    return Dims(batch, n_q, n_kv, n_tokens, d, v_shape[3])


def per_layer_config(cfg: Config, maps: Sequence[FeatureMap]) -> Callable[[int], Config]:
    """``layer_idx -> Config`` with that layer's (learned) map: what the model caches take per layer."""
    configs = [cfg.replace(feature_map=fmap, n_features=fmap.n_features) for fmap in maps]
    return lambda i: configs[i]


@functools.lru_cache(maxsize=64)
def _named_feature_map(kind: str, d: int, n_features: int, seed: int) -> FeatureMap:
    if kind == "prf":
        return FeatureMap.prf(d, n_features, seed)
    return FeatureMap.taylor2(d)
