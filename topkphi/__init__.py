"""topkphi: exact attention over sink, tail and Top-K tokens, plus a feature-map estimate of the rest.

    import topkphi
    cfg = topkphi.Config(n_sink=4, n_tail=64, top_k=256)
    be = topkphi.get_backend("numpy")
    summary = be.build_summary(k, v, cfg)
    out, stats = be.decode(q, k, v, summary, cfg)
"""

from topkphi.backends import Backend, BackendUnavailable, DecodeStats, available_backends, get_backend
from topkphi.config import Config, Dims
from topkphi.feature_maps import FeatureMap
from topkphi.reads import ReadCounts, matched_top_k, read_counts
from topkphi.regions import Regions
from topkphi.step import StepPlan, plan_step
from topkphi.summary import ReferenceQueries, Summary

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendUnavailable",
    "Config",
    "DecodeStats",
    "Dims",
    "FeatureMap",
    "ReadCounts",
    "ReferenceQueries",
    "Regions",
    "StepPlan",
    "Summary",
    "available_backends",
    "get_backend",
    "matched_top_k",
    "plan_step",
    "read_counts",
]
