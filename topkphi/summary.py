"""The fixed-size side state kept beside the KV cache (SPEC section 4).

Arrays are the backend's own type; this module only says what they hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from topkphi.config import Config


@dataclass
class Summary:
    """Feature-map summary of the folded mid tokens plus Quest-style page metadata.

    ``s [B,Hkv,m,dv]`` and ``z [B,Hkv,m]`` hold ``sum_j w_j v_j^T`` and ``sum_j w_j`` with
    ``w_j = exp(l_k(k_j) - c_max)``; ``c_max [B,Hkv]`` is ``C`` (-inf while nothing is folded).
    ``kmin``/``kmax [B,Hkv,n_pages,d]`` cover pages ``first_page ..`` of the folded range.
    """

    n_tokens: int  # cache length this summary describes
    mid_start: int  # folded range [mid_start, mid_end)
    mid_end: int
    s: Any = None  # None when the completion is off
    z: Any = None
    c_max: Any = None
    kmin: Any = None  # None unless selection == "page"
    kmax: Any = None
    first_page: int = 0

    @property
    def n_folded(self) -> int:
        return self.mid_end - self.mid_start

    @property
    def n_pages(self) -> int:
        return 0 if self.kmin is None else int(self.kmin.shape[2])


def check_compatible(summary: Summary, cfg: Config, n_tokens: int | None = None) -> None:
    """Refuse a summary made for another config, or (with ``n_tokens``) for another cache length."""
    if n_tokens is not None and summary.n_tokens != n_tokens:
        raise ValueError(f"summary describes {summary.n_tokens} tokens, the cache has {n_tokens}: call append")
    if summary.mid_start != cfg.n_sink:
        raise ValueError(f"summary was built with n_sink={summary.mid_start}, the config says {cfg.n_sink}")
    if cfg.completion and summary.s is None:
        raise ValueError("summary was built without a feature map; rebuild it with this config")
    if cfg.selection == "page" and summary.kmin is None:
        raise ValueError("summary has no page metadata; rebuild it with selection='page'")


def fold_range(summary: Summary, cfg: Config, n_tokens: int) -> tuple[int, int]:
    """``[lo, hi)``: the positions that left the tail since ``summary`` was made (empty if none)."""
    if n_tokens < summary.n_tokens:
        raise ValueError(f"the cache shrank from {summary.n_tokens} to {n_tokens} tokens: build a new summary")
    check_compatible(summary, cfg)
    lo = summary.mid_end
    return lo, max(lo, cfg.n_sink, n_tokens - cfg.n_tail)
