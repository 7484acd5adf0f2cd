"""User mistakes become one line and exit code 2; bugs keep their traceback."""

from __future__ import annotations

import functools
from collections.abc import Callable

import click

from topkphi.backends.registry import BackendUnavailable


def user_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, BackendUnavailable, FileNotFoundError) as err:
            raise click.UsageError(str(err).splitlines()[0] if str(err) else type(err).__name__) from None

    return wrapper
