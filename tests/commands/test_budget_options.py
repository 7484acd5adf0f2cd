"""The per-head budget flags (SPEC 10): bad values are one line, exit 2, before any model loads."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from topkphi.cli import main

BAD = [
    (["--budget", "mass", "--max-dropped-mass", "0"], "dropped"),
    (["--budget", "mass", "--max-dropped-mass", "1"], "dropped"),
    (["--budget", "mass", "--max-dropped-mass", "-0.1"], "dropped"),
    (["--budget", "mass", "--top-k", "32", "--min-top-k", "64"], "min_top_k (the floor) must lie in [0, top_k=32]"),
    (["--certify"], "needs budget='mass'"),
    (["--budget", "mass", "--certify", "--selection", "compact"], "upper bound"),
    (["--budget", "sometimes"], "'sometimes' is not one of"),
]


@pytest.mark.parametrize("command", ["chat", "inspect-heads", "eval"])
@pytest.mark.parametrize("args, fragment", BAD)
def test_bad_budget_flags_are_one_line_exit_2(command, args, fragment):
    # a model that does not exist: the flags must be refused before anything tries to load it
    extra = {"chat": ["--prompt", "hi"], "inspect-heads": ["--text", "hi", "--feature-map", "compact"],
             "eval": ["--tasks", "kl"]}[command]
    if command == "eval":  # eval's budgets are --budgets (the smallest stands in for validation)
        args = ["--budgets" if a == "--top-k" else a for a in args] + ([] if "--top-k" in args else ["--budgets", "64"])
    if command == "inspect-heads" and "--max-dropped-mass" in args:
        args = [*args, "--budget", "mass"]
    result = CliRunner().invoke(main, [command, "--model", "/nonexistent/model", *extra, *args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0], result.output
    assert "Traceback" not in result.output
