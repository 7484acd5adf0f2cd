"""What one reply cost: speeds, the share of the KV cache read, and the estimated unread mass."""

from __future__ import annotations

from dataclasses import dataclass

# what each field of the stats line means (chat's `h` prints it)
LEGEND = (
    "Stats line: prefill = prompt tokens run this turn (cached ones are reused) and their speed; decode = reply "
    "tokens and their speed; KV read = mean share of the KV cache one decode step reads, in token-equivalents "
    "(sink + tail + Top-K exactly, plus the summary and the selection's reads; 100% = dense); rho = mean share "
    "of the attention mass the estimate put on the tokens not read; phi fit = time spent fitting per-prompt maps; "
    "with --budget mass/marginal: p95 = the 95th percentile of one KV head's read share over heads and steps, "
    "drop = mean estimated dropped mass, cert = mean certified bound (--certify), capped = head-steps the cap "
    "stopped before the target held."
)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    generated_tokens: int = 0
    decode_s: float = 0.0
    read_fraction: float = 1.0  # mean token-equivalents read per decode step / context
    rho: float | None = None  # mean estimated unretrieved mass; None for dense
    fit_s: float = 0.0  # per-prompt phi fit before this reply's decode (the capture counts as prefill)
    budget: dict | None = None  # per-head budgets (SPEC 10): reads_p95, delta_hat, delta_bar, capped

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def fields(self) -> list[str]:
        rho = "dense" if self.rho is None else f"rho {self.rho:.3f}"
        out = [f"phi fit {self.fit_s:.1f} s"] if self.fit_s > 0 else []
        return out + [f"prefill {self.prompt_tokens} tok @ {_speed(self.prefill_tps)} tok/s",
                      f"decode {self.generated_tokens} tok @ {_speed(self.decode_tps)} tok/s",
                      f"KV read {self.read_fraction:.1%}", rho, *self._budget_fields()]

    def _budget_fields(self) -> list[str]:
        b = self.budget
        if b is None:
            return []
        cert = "" if b.get("delta_bar") is None else f", cert {b['delta_bar']:.3f}"
        return [f"p95 {b['reads_p95']:.1%}", f"drop {b['delta_hat']:.3f}{cert}, capped {b['capped']:.0%}"]

    def line(self, width: int = 80) -> str:
        """The fields joined by `` | ``, broken between fields (never inside one) to lines of ``width``."""
        lines: list[str] = []
        for field in self.fields():
            if lines and len(lines[-1]) + 3 + len(field) <= width:
                lines[-1] += " | " + field
            else:
                lines.append(field)
        return "\n".join(lines)


def _speed(tps: float) -> str:
    return f"{tps:.0f}" if tps >= 100 else f"{tps:.1f}"


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
