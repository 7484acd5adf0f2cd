"""What every backend provides, and what a decode step reports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from topkphi.config import Config
from topkphi.summary import Summary


@dataclass
class DecodeStats:
    """Diagnostics of one decode step; arrays are the backend's own type.

    ``selected [B,Hkv,T]`` holds the retrieved mid positions (ascending, padded with -1 where
    a KV head retrieved fewer, as page selection can); ``rho [B,Hq]`` is the estimated
    unretrieved mass fraction; reads are per KV head, in tokens and token-equivalents.
    """

    rho: Any  # [B, Hq]
    selected: Any  # [B, Hkv, T]
    n_selected: Any  # [B, Hkv]
    tokens_read: Any  # [B, Hkv] keys+values read exactly (sink + tail + retrieved)
    token_equivalents: Any  # [B, Hkv] exact + summary + selection reads (SPEC section 6)
    n_tokens: int  # context length N

    def read_fraction(self) -> float:
        """Mean token-equivalents read per KV head as a fraction of the context."""
        return float(_mean(self.token_equivalents)) / self.n_tokens


def _mean(x: Any) -> float:
    return float(x.mean().item() if hasattr(x.mean(), "item") else x.mean())


class Backend(Protocol):
    name: str

    def build_summary(self, k: Any, v: Any, cfg: Config) -> Summary:
        """Fold the mid region of ``k [B,Hkv,N,d]``, ``v [B,Hkv,N,dv]`` into a fresh summary."""

    def append(self, summary: Summary, k: Any, v: Any, cfg: Config) -> Summary:
        """Fold the tokens that left the tail since ``summary`` was made; ``k``, ``v`` is the whole cache."""

    def decode(self, q: Any, k: Any, v: Any, summary: Summary, cfg: Config) -> tuple[Any, DecodeStats]:
        """Attention of ``q [B,Hq,d]`` over the cache: exact on sink+tail+Top-K, phi completion for the rest."""

    def dense(self, q: Any, k: Any, v: Any, scale: float | None = None) -> Any:
        """Exact softmax attention over the whole cache, ``[B,Hq,dv]``."""
