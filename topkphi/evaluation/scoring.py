"""RULER's metrics, next-token KL and perplexity, and the entropy-tercile split of per-head errors."""

from __future__ import annotations

import math
import re

import numpy as np

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """RULER's ``postprocess_pred``: control characters become newlines, then strip."""
    return _CONTROL.sub("\n", prediction).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """Share of the references found in the prediction (case-insensitive), in [0, 1]."""
    if not references:
        raise ValueError("no references to match")
    pred = postprocess(prediction).lower()
    return sum(ref.lower() in pred for ref in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """1 if any reference is in the prediction (case-insensitive), else 0."""
    if not references:
        raise ValueError("no references to match")
    pred = postprocess(prediction).lower()
    return float(any(ref.lower() in pred for ref in references))


METRICS = {"all": string_match_all, "part": string_match_part}


def score(metric: str, prediction: str, references: list[str]) -> float:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(METRICS)}")
    return METRICS[metric](prediction, references)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(reference_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """``KL(p_ref || p)`` in nats along the last axis (reference = dense)."""
    lp_ref, lp = log_softmax(reference_logits), log_softmax(logits)
    return np.clip((np.exp(lp_ref) * (lp_ref - lp)).sum(axis=-1), 0.0, None)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``targets [n]`` under ``logits [n, vocab]``."""
    lp = log_softmax(logits)
    return -lp[np.arange(len(targets)), np.asarray(targets)]


def perplexity(nll: np.ndarray) -> float:
    return float(math.exp(float(np.mean(nll)))) if len(nll) else float("nan")


TERCILES = ("low", "mid", "high")


def entropy_terciles(entropy: np.ndarray, errors: dict[str, np.ndarray]) -> dict:
    """Mean of each ``errors[name]`` over the heads in each tercile of ``entropy`` (all arrays flat, aligned).

    Returns ``{"edges": [e1, e2], "n": [..3], name: {"low": .., "mid": .., "high": .., "all": ..}}``.
    """
    entropy = np.asarray(entropy, np.float64).ravel()
    edges = np.quantile(entropy, [1 / 3, 2 / 3]) if entropy.size else np.array([np.nan, np.nan])
    bins = np.digitize(entropy, edges, right=True)  # 0: <= e1, 1: (e1, e2], 2: > e2
    out: dict = {"edges": [float(e) for e in edges], "n": [int((bins == i).sum()) for i in range(3)]}
    for name, err in errors.items():
        err = np.asarray(err, np.float64).ravel()
        row = {t: (float(err[bins == i].mean()) if (bins == i).any() else None) for i, t in enumerate(TERCILES)}
        row["all"] = float(err.mean()) if err.size else None
        out[name] = row
    return out
