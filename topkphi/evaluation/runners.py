"""A model under evaluation: one dense prefill to share, then a decode session per policy, stepped one token
at a time. Framework-free: the runtime (``topkphi.commands.runtime.Runtime.runner``) hands in how to make a
generation engine and how to capture q/k/v; everything else goes through the engines' public step API."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from topkphi.config import Config
from topkphi.evaluation.policies import Policy
from topkphi.models.tokenize import encode_long

FIT_WINDOW = Config().fit_window  # query rows kept per layer for the fitted summaries


@dataclass
class Snapshot:
    kv: list[tuple]  # per layer (k [1,Hkv,N,d], v), float32 NumPy
    queries: list  # per layer the last query rows [1,Hq,<=W,d] (post-RoPE), ending at N


@dataclass
class Session:
    step: Callable[[int], np.ndarray]  # feed one token, get the next-token logits [vocab]
    read_fraction: Callable[[], float]  # mean over decode steps so far, every layer


class Runner:
    """``make_engine(cfg, backend)`` -> a generation engine (``cfg=None``: dense); ``capture(ids, n_queries)``
    -> every layer's ``LayerCapture``; ``kernel``: the backend topkphi's policies decode with."""

    def __init__(self, make_engine: Callable, capture: Callable, tokenizer, kernel) -> None:
        self.make_engine, self._capture, self.tokenizer, self.kernel = make_engine, capture, tokenizer, kernel
        probe = make_engine(None, None)
        self.d, self.dv = probe.head_dims
        self.eos = set(probe.eos)
        self.model = probe.model

    def encode(self, text: str) -> list[int]:
        return encode_long(self.tokenizer, text)

    def decode(self, ids: list[int]) -> str:
        try:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        except TypeError:  # tokenizers whose decode takes the ids only
            return self.tokenizer.decode(ids)

    def prefill(self, ids: list[int]) -> Snapshot:
        """The dense KV cache of ``ids`` and each layer's last ``FIT_WINDOW`` query rows (one captured
        forward): every policy starts from a copy, and fitted summaries fit from those rows (SPEC 8)."""
        layers = self._capture(ids, FIT_WINDOW)
        return Snapshot([(c.k, c.v) for c in layers], [c.q for c in layers])

    def session(self, snapshot: Snapshot, pol: Policy) -> Session:
        engine = self.make_engine(pol.engine_cfg, pol.decode_backend(self.kernel))
        engine.load_kv(snapshot.kv, snapshot.queries)
        return Session(lambda token: engine.feed([token]), lambda: engine.decode_totals()[1])

    def capture(self, ids: list[int], n_queries: int):
        return self._capture(ids, n_queries)
