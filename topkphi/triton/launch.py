"""How this machine launches the kernels, and the tuning a backend is built with.

``interpreter_on`` is the one place that reads ``TRITON_INTERPRET`` (Triton's own switch: CPU
tensors run in its interpreter). Tuning is explicit data, never an environment variable.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class TritonTuning:
    """Launch choices of the Triton backend; every default is the measured best (docs/KERNEL_NOTES.md).

    ``chain_launches``: on sm90+ each kernel of a step launches as a programmatic dependent of the
    previous one (starts while it drains, waits in-kernel): 2-6 us off a step on an H200.
    ``decode_split``: read entries per decode program (a multiple of ``decode_block_n``); None picks
    about one program per SM. ``phi_dot16``: with a 16-bit cache the retrieved tokens' feature
    weights are one tensor-core product in the cache dtype instead of tf32.
    ``select_warps``: warps of the threshold selection program (one program per KV head).
    ``decode_page_split``: compact pages per pseudo-token program (None: about one program per SM).
    """

    chain_launches: bool = True
    decode_block_n: int = 64
    decode_warps: int = 4
    decode_split: int | None = None
    phi_dot16: bool = True
    select_warps: int = 8
    decode_page_split: int | None = None

    def __post_init__(self) -> None:
        for name in ("decode_block_n", "decode_warps", "select_warps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("decode_split", "decode_page_split"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or a positive integer, got {value!r}")


def interpreter_on() -> bool:
    """Triton's own switch: ``TRITON_INTERPRET=1`` runs every kernel in its Python interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting(t: torch.Tensor) -> bool:
    """Whether Triton kernels on ``t`` run in the interpreter (CPU tensors, or the switch is on)."""
    return interpreter_on() or t.device.type == "cpu"


def runnable_on(t: torch.Tensor) -> bool:
    """Whether a kernel can run on ``t``: a CUDA tensor, or any tensor under the interpreter."""
    return t.is_cuda or interpreter_on()


def chains_launches(t: torch.Tensor, tuning: TritonTuning) -> bool:
    """Whether a step's kernels on ``t`` launch chained (programmatic dependent launch, sm90+)."""
    if not tuning.chain_launches or interpreting(t) or not _triton_has_pdl():
        return False
    return torch.cuda.get_device_capability(t.device)[0] >= 9


@functools.cache
def _triton_has_pdl() -> bool:
    # gdc_wait and launch_pdl came with Triton 3.3; the [cuda] extra admits 3.2
    try:
        import triton.language.extra.cuda as cuda_extra
    except ImportError:
        return False
    return hasattr(cuda_extra, "gdc_wait")


@functools.cache
def n_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def p2(n: int, lo: int = 1) -> int:
    """The next power of two >= max(n, lo): Triton block sizes are powers of two."""
    return max(lo, triton.next_power_of_2(max(1, n)))


def round16(n: int) -> int:
    """``n`` rounded up to a multiple of 16 (at least 16): buffer rows whose strides keep their hints."""
    return max(16, -(-n // 16) * 16)
