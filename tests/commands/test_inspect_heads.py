"""`topkphi inspect-heads` end to end on the tiny random Llamas (torch and mlx), its JSON schema, and bad input."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest
from click.testing import CliRunner

from topkphi.cli import main

HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
HAS_CUDA = HAS_TORCH and __import__("torch").cuda.is_available()
HAS_MLX = importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None
TEXT = "".join(chr(33 + (7 * i) % 90) for i in range(120))  # 120 tokens with the tokenizer below


class CharTokenizer:
    """One token per character, within the tiny models' vocabulary of 96."""

    def encode(self, text):
        return [ord(c) % 96 for c in text]


@pytest.fixture
def tiny_model(monkeypatch, request):
    """``--backend`` for a runtime whose model loader returns a tiny random Llama."""
    import topkphi.models.resolve as resolve

    if request.param in ("torch", "triton"):
        from tests.integrations.test_hf import tiny_llama

        monkeypatch.setattr(resolve, "load_torch_model",
                            lambda spec, device="cpu", **kw: (tiny_llama().to(device), CharTokenizer()))
    else:
        from tests.integrations.test_mlx_lm import tiny_llama

        monkeypatch.setattr(resolve, "load_mlx_model", lambda spec, **kw: (tiny_llama(), CharTokenizer()))
    return request.param


RUNTIMES = [
    pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="torch and transformers are not installed")),
    pytest.param("mlx", marks=pytest.mark.skipif(not HAS_MLX, reason="mlx and mlx-lm are not installed")),
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")),
]


def run(*args, stdin=None):
    return CliRunner().invoke(main, ["inspect-heads", *args], input=stdin)


def assert_usage_error(result, fragment):
    assert result.exit_code == 2, result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and fragment in error_lines[0], result.output
    assert "Traceback" not in result.output


HEAD_FIELDS = {
    "layer": int, "q_head": int, "kv_head": int, "entropy": float, "sink_mass": float, "tail_mass": float,
    "topk_mass": float, "dropped_mass": float, "rho": float, "mid_mass_error": (float, type(None)),
    "err_top_k": float, "err_phi": float, "phi_gain": float, "suggested_top_k": int, "suggested_top_k_kv": int,
    "chosen_top_k_kv": float, "delta_hat": (float, type(None)), "delta_bar": (float, type(None)),
}


@pytest.mark.parametrize("tiny_model", RUNTIMES, indirect=True)
def test_tiny_model_end_to_end(tiny_model, tmp_path):
    out_json, out_csv, out_png = tmp_path / "heads.json", tmp_path / "heads.csv", tmp_path / "plots" / "heads.png"
    result = run("--backend", tiny_model, "--text", TEXT, "--top-k", "16", "--n-tail", "16", "--page-size", "8",
                 "--selection", "exact", "--feature-map", "prf",
                 "--n-queries", "3", "--json", str(out_json), "--csv", str(out_csv), "--plot", str(out_png))
    assert result.exit_code == 0, result.output
    assert "H/logN" in result.output and "phi helps in" in result.output and "corr(entropy, gain)" in result.output

    report = json.loads(out_json.read_text())
    assert set(report) == {"model", "runtime", "n_tokens", "positions", "config", "max_dropped_mass", "summary",
                           "heads"}
    assert report["n_tokens"] == 120 and report["positions"] == [117, 118, 119]
    assert report["runtime"]["framework"] == ("mlx" if tiny_model == "mlx" else "torch")
    assert report["config"]["top_k"] == 16 and report["config"]["top_k_matched"] > 16
    assert len(report["heads"]) == 2 * 4  # tiny Llamas: 2 layers x 4 query heads (2 KV heads)
    for head in report["heads"]:
        assert set(head) == set(HEAD_FIELDS)
        for key, kind in HEAD_FIELDS.items():
            assert isinstance(head[key], kind), (key, head[key])
        assert 0.0 <= head["entropy"] <= 1.0 + 1e-9 and 0.0 <= head["dropped_mass"] <= 1.0
        assert head["suggested_top_k"] <= head["suggested_top_k_kv"]
        assert head["chosen_top_k_kv"] == 16 and head["delta_hat"] is None  # the fixed budget's count
    summary = report["summary"]
    assert summary["n_heads"] == 8 and 0.0 <= summary["share_high_entropy"] <= 1.0
    assert summary["phi_helps"] + summary["phi_hurts"] + summary["phi_neutral"] == 8

    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 8 and set(rows[0]) == set(HEAD_FIELDS)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 1000


@pytest.mark.parametrize("tiny_model", RUNTIMES[:1], indirect=True)
def test_budget_covering_the_prompt_is_exact_attention(tiny_model):
    result = run("--backend", tiny_model, "--text", TEXT, "--top-k", "4096", "--n-queries", "2", "--json", "-")
    assert result.exit_code == 0, result.output
    assert "both methods are exact attention" in result.stderr  # said, not only shown in the numbers
    heads = json.loads(result.stdout)["heads"]
    assert all(h["dropped_mass"] == pytest.approx(0.0, abs=1e-12) and h["err_phi"] < 1e-9 for h in heads)
    assert all(h["mid_mass_error"] is None and h["phi_gain"] == pytest.approx(0.0, abs=1e-6) for h in heads)


@pytest.mark.parametrize("tiny_model", RUNTIMES[:1], indirect=True)
def test_prompt_too_short_to_inspect(tiny_model):
    assert_usage_error(run("--backend", tiny_model, "--text", TEXT[:70]), "nothing is left to inspect")


@pytest.mark.parametrize("tiny_model", RUNTIMES[:1], indirect=True)
def test_prompt_file_and_stdin(tiny_model, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(TEXT)
    for args, stdin in ((["--prompt-file", str(prompt)], None), (["--prompt-file", "-"], TEXT)):
        result = run("--backend", tiny_model, *args, "--n-tail", "8", "--n-queries", "1", "--json", "-", stdin=stdin)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["n_tokens"] == 120


def test_missing_prompt_file(tmp_path):
    assert_usage_error(run("--prompt-file", str(tmp_path / "nope.txt")), "nope.txt")


@pytest.mark.parametrize("args,fragment", [
    ([], "exactly one of --prompt-file or --text"),
    (["--text", "a", "--prompt-file", "b"], "exactly one of --prompt-file or --text"),
    (["--text", "a", "--n-queries", "0"], "--n-queries"),
    (["--text", "a", "--max-dropped-mass", "1.5"], "--max-dropped-mass"),
    (["--text", "a", "--top-k", "0"], "top_k must be >= 1"),
])
def test_bad_options(args, fragment):
    assert_usage_error(run(*args), fragment)


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the options must be refused before it."""
    import topkphi.models.resolve as resolve

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(resolve, "load_torch_model", refuse)
    monkeypatch.setattr(resolve, "load_mlx_model", refuse)


def test_plot_without_matplotlib_fails_before_any_work(no_model, monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert_usage_error(run("--text", TEXT, "--plot", str(tmp_path / "heads.png")), "--plot needs matplotlib")


@pytest.mark.parametrize("args,fragment", [
    (["--plot", "heads.svg"], "does not end in .png"),
    (["--json", "."], "is a folder"),
    (["--feature-map", "none"], "nothing to compare"),
])
def test_output_options_are_checked_before_any_work(no_model, args, fragment):
    assert_usage_error(run("--text", TEXT, *args), fragment)


def test_listed_in_help():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "inspect-heads" in result.output


@pytest.mark.parametrize("tiny_model", RUNTIMES[:1], indirect=True)
def test_a_certified_mass_budget_is_compared_with_the_suggestion(tiny_model, tmp_path):
    out_json = tmp_path / "heads.json"
    result = run("--backend", tiny_model, "--text", TEXT, "--top-k", "48", "--n-tail", "16", "--selection", "exact",
                 "--feature-map", "prf", "--budget", "mass", "--certify", "--max-dropped-mass", "0.3",
                 "--min-top-k", "4", "--n-queries", "2", "--json", str(out_json))
    assert result.exit_code == 0, result.output
    assert "chosen by the policy" in result.output
    report = json.loads(out_json.read_text())
    assert report["config"]["budget"] == "mass" and report["config"]["certify"] is True
    for head in report["heads"]:
        assert 4 <= head["chosen_top_k_kv"] <= 48
        # exact selection: the certificate is the exact dropped mass of the KV head's read set
        assert head["delta_bar"] >= head["dropped_mass"] - 1e-9
        assert head["delta_hat"] == pytest.approx(head["delta_bar"], abs=1e-6)  # exact scores: estimate = bound
