"""A model under evaluation: one dense prefill to share, then a decode session per policy, stepped one token
at a time. Framework-free: the runtime (``topkphi.commands.runtime.Runtime.runner``) hands in how to make a
generation engine and how to capture q/k/v; everything else goes through the engines' public step API."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from topkphi.evaluation.policies import Policy
from topkphi.models.tokenize import encode_long


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

    def prefill(self, ids: list[int]) -> list[tuple]:
        """The dense KV cache of ``ids``, per layer ``(k, v)``: every policy starts from a copy of it."""
        engine = self.make_engine(None, None)
        engine.feed(ids)
        return engine.kv()

    def session(self, snapshot: list[tuple], pol: Policy) -> Session:
        engine = self.make_engine(pol.engine_cfg, pol.decode_backend(self.kernel))
        engine.load_kv(snapshot)
        return Session(lambda token: engine.feed([token]), lambda: engine.decode_totals()[1])

    def capture(self, ids: list[int], n_queries: int):
        return self._capture(ids, n_queries)
