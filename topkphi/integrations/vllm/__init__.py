"""topkphi inside vLLM: an attention backend registered by a ``vllm.general_plugins`` entry point.

vLLM loads :func:`register` in every process it starts (API server, engine core, each
tensor-parallel worker). It registers the backend as vLLM's ``CUSTOM`` attention backend and
selects nothing: a server uses topkphi only when asked, the way vLLM selects any backend::

    vllm serve MODEL --attention-backend CUSTOM \\
        --additional-config '{"topkphi": {"top_k": 256, "selection": "page", "feature_map": "prf"}}'

or from Python, with a ``topkphi.Config``::

    from vllm import LLM
    from topkphi.integrations.vllm import engine_kwargs
    llm = LLM(MODEL, **engine_kwargs(topkphi.Config(top_k=256, selection="page", feature_map=None)))
    llm.collective_rpc("topkphi_stats")   # per worker: decode rows, reads, side-buffer bytes

Prefill and mixed batches run vLLM's own kernel; each decode row runs topkphi over the
sequence's paged blocks (``store.py`` says how summaries are kept). With tensor parallelism
each rank holds its own KV heads, so selection and summaries are rank-local.
This module imports neither torch nor vllm until vLLM calls it.
"""

from __future__ import annotations

from typing import Any

from topkphi.config import Config
from topkphi.integrations.vllm.options import KEY, VLLM_DEFAULT, VllmOptions

__all__ = ["KEY", "TopKPhiWorkerExtension", "VllmOptions", "backend_path", "engine_kwargs", "register"]

BACKEND_NAME = "CUSTOM"  # vLLM's registry member for third-party backends
_PATHS = {
    "cpu": "topkphi.integrations.vllm.cpu.TopKPhiCPUBackend",
    "cuda": "topkphi.integrations.vllm.cuda.TopKPhiCUDABackend",
}


def backend_path(device_type: str) -> str:
    """The backend class vLLM resolves for ``CUSTOM`` on a platform (``cpu`` or ``cuda``)."""
    if device_type not in _PATHS:
        raise NotImplementedError(f"topkphi's vLLM backend runs on {' and '.join(_PATHS)}, not {device_type}")
    return _PATHS[device_type]


def register() -> None:
    """The plugin: make ``--attention-backend CUSTOM`` mean topkphi (idempotent, selects nothing)."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.device_type not in _PATHS:
        return  # vLLM on another accelerator: leave CUSTOM to others
    path = backend_path(current_platform.device_type)
    register_backend(AttentionBackendEnum.CUSTOM, path)
    if current_platform.is_cpu():
        _let_cpu_platform_select_custom(path)


def _let_cpu_platform_select_custom(path: str) -> None:
    """vLLM's CPU platform answers CPU_ATTN whatever backend was asked for (platforms/cpu.py);
    teach it to honour CUSTOM when it is ours. Every other selection goes through unchanged."""
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    original = CpuPlatform.get_attn_backend_cls
    if getattr(original, "_topkphi", False):
        return

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        custom = AttentionBackendEnum.CUSTOM
        if selected_backend == custom and custom.is_overridden() and custom.get_path() == path:
            if attn_selector_config.use_mla or attn_selector_config.use_sparse:
                raise NotImplementedError("topkphi's vLLM backend supports standard (non-MLA, dense) attention only")
            return path
        return original.__func__(cls, selected_backend, attn_selector_config, num_heads)

    get_attn_backend_cls._topkphi = True
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def engine_kwargs(cfg: Config | None = None, *, backend: str = "auto", max_side_mib: int | None = None,
                  stats: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` / ``EngineArgs`` that serve with topkphi under ``cfg``.

    ``stats`` adds the worker extension behind ``llm.collective_rpc("topkphi_stats")``.
    """
    options = VllmOptions(cfg or VLLM_DEFAULT, backend, *(() if max_side_mib is None else (max_side_mib,)))
    kwargs: dict[str, Any] = {"attention_backend": BACKEND_NAME, "additional_config": {KEY: options.to_dict()}}
    if stats:
        kwargs["worker_extension_cls"] = f"{__name__}.TopKPhiWorkerExtension"
    return kwargs


class TopKPhiWorkerExtension:
    """Mixed into vLLM's worker class (``--worker-extension-cls``): ``collective_rpc("topkphi_stats")``."""

    def topkphi_stats(self) -> dict:
        from topkphi.integrations.vllm.store import worker

        return worker().stats()
