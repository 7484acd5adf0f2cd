"""Backends: one file each, reached through the registry so no framework is imported early."""

from topkphi.backends.base import Backend, DecodeStats
from topkphi.backends.registry import BackendUnavailable, available_backends, backend_names, get_backend

__all__ = ["Backend", "BackendUnavailable", "DecodeStats", "available_backends", "backend_names", "get_backend"]
