"""`topkphi backends`: which backends run on this machine."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def backends(as_json: bool) -> None:
    """List the backends and whether each runs here."""
    from topkphi.backends.registry import describe_backends

    rows = describe_backends()
    if as_json:
        click.echo(json.dumps([{"backend": n, "available": ok, "install": hint} for n, ok, hint in rows]))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="topkphi backends")
    for column in ("backend", "available", "how to get it"):
        table.add_column(column)
    for name, ok, hint in rows:
        # escaped: rich reads `[torch]` in `pip install "topkphi[torch]"` as markup and drops it
        table.add_row(name, "[green]yes[/]" if ok else "[red]no[/]", "" if ok else escape(hint))
    Console().print(table)
