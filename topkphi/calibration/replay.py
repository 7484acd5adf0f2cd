"""Replaying decode steps of a capture with the float64 oracle: how learned maps are scored, and the
captures the fits and their scoring share (a prompt's prefix; a prompt-internal validation split)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from topkphi.capture import LayerCapture
from topkphi.feature_maps import FeatureMap


def truncate(capture: LayerCapture, n_tokens: int) -> LayerCapture:
    """The capture of the first ``n_tokens`` positions only (a prompt's prefill, before its decode steps)."""
    first_q = capture.k.shape[2] - capture.q.shape[2]
    if n_tokens <= first_q:
        raise ValueError("the truncated capture holds no query")
    return LayerCapture(
        capture.q[:, :, : n_tokens - first_q], capture.k[:, :, :n_tokens], capture.v[:, :, :n_tokens], capture.scale
    )


def split_validation(capture: LayerCapture, n_val: int) -> list[LayerCapture]:
    """``[train, validation]`` from one capture: the queries of its last ``n_val`` positions score the
    iterates (``FitOptions.validation = 1``), the earlier ones train; both see every key."""
    n_queries = capture.q.shape[2]
    if not 0 < n_val < n_queries:
        raise ValueError(f"validation needs 0 < n_val < {n_queries} captured queries, got {n_val}")
    train = truncate(capture, capture.k.shape[2] - n_val)
    return [train, LayerCapture(capture.q[:, :, -n_val:], capture.k, capture.v, capture.scale)]


def replay_errors(
    layers: Sequence[LayerCapture],
    positions: Sequence[int],
    n_sink: int,
    n_tail: int,
    top_k: int,
    maps: Sequence[FeatureMap] | None,
) -> np.ndarray:
    """Relative attention-output error vs dense, ``[layers, positions, Hq]``, with the float64 oracle.

    ``maps=None``: Top-K only at ``top_k``; else Top-K + the layer's learned map."""
    from topkphi.backends.numpy_backend import NumpyBackend
    from topkphi.config import Config

    oracle = NumpyBackend()
    errors = []
    for i, cap in enumerate(layers):
        cfg = Config(
            n_sink=n_sink,
            n_tail=n_tail,
            top_k=top_k,
            selection="exact",
            scale=cap.scale,
            feature_map=None if maps is None else maps[i],
        )
        rows = []
        for pos in positions:
            q, k, v = cap.decode_step(pos)
            ref = oracle.dense(q, k, v, cap.scale)
            out, _ = oracle.decode(q, k, v, oracle.build_summary(k, v, cfg), cfg)
            rows.append(np.linalg.norm(out - ref, axis=-1)[0] / np.linalg.norm(ref, axis=-1)[0])
        errors.append(rows)
    return np.asarray(errors)
