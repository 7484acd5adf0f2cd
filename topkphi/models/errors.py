"""The one exception a user's mistake raises, and the check for optional packages."""

from __future__ import annotations

import importlib.util


class ModelError(ValueError):
    """A model spec that cannot be resolved or loaded; the message is one line, fit for the CLI."""


def require(extra: str, *modules: str) -> None:
    """Raise ModelError naming the pip extra when any of ``modules`` is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelError(
            f"the {extra} backend needs {', '.join(missing)}: pip install 'topkphi[{extra}]'"
        )
