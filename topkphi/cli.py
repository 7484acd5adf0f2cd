"""The `topkphi` command. Subcommands live in `topkphi/commands/` and are imported only when run,
so `topkphi --help` stays instant on a machine without torch or mlx."""

from __future__ import annotations

import importlib

import click

import topkphi

# name -> (module, function, one-line help shown by --help without importing the module)
SUBCOMMANDS = {
    "calibrate": ("topkphi.commands.calibrate", "calibrate", "Fit learned feature maps (a phi file) on text."),
    "chat": ("topkphi.commands.chat", "chat", "Chat with a model through topkphi (or --dense)."),
    "backends": ("topkphi.commands.backends", "backends", "List the backends and whether each runs here."),
    "demo": ("topkphi.commands.demo", "demo", "Top-K only vs Top-K + phi against dense, on random KV."),
    "eval": ("topkphi.commands.eval", "eval_command", "Task accuracy, KL and attention error at matched KV reads."),
    "inspect-heads": ("topkphi.commands.inspect_heads", "inspect_heads", "Per-head entropy, dropped mass, phi gain."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        module, attr, _ = SUBCOMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, SUBCOMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(topkphi.__version__, prog_name="topkphi")
def main() -> None:
    """Long-context decoding that reads a few KV tokens exactly and estimates the rest."""


if __name__ == "__main__":
    main()
