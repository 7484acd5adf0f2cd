"""What one reply cost: speeds, the share of the KV cache read, and the estimated unread mass."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    generated_tokens: int = 0
    decode_s: float = 0.0
    read_fraction: float = 1.0  # mean token-equivalents read per decode step / context
    rho: float | None = None  # mean estimated unretrieved mass; None for dense
    fit_s: float = 0.0  # per-prompt phi fit (capture + fit) before this reply's prefill

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def line(self) -> str:
        rho = "dense" if self.rho is None else f"rho {self.rho:.3f}"
        fit = f"phi fit {self.fit_s:.1f} s | " if self.fit_s > 0 else ""
        return (f"{fit}prefill {self.prompt_tokens} tok @ {self.prefill_tps:.1f} tok/s | "
                f"decode {self.generated_tokens} tok @ {self.decode_tps:.1f} tok/s | "
                f"KV read/step {self.read_fraction:.1%} | {rho}")


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
