"""`topkphi eval` end to end on the tiny random Llama, matched reads, and bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("torch", reason="the harness test runs the tiny torch Llama")
pytest.importorskip("transformers", reason="the harness test runs the tiny torch Llama")
pytest.importorskip("wonderwords", reason="the evaluation tasks need wonderwords")

import topkphi  # noqa: E402
from topkphi.cli import main  # noqa: E402
from topkphi.commands.runtime import resolve_runtime  # noqa: E402
from topkphi.evaluation.harness import EvalSpec, evaluate  # noqa: E402
from topkphi.evaluation.policies import policy  # noqa: E402


class CharTokenizer:
    """One token per character, within the tiny model's vocabulary of 96."""

    eos_token_id = None

    def encode(self, text):
        return [ord(c) % 96 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + i % 95) for i in ids)


@pytest.fixture
def tiny(monkeypatch):
    import topkphi.models.resolve as resolve
    from tests.integrations.test_hf import tiny_llama

    monkeypatch.setattr(resolve, "load_torch_model", lambda spec, device="cpu", **kw: (tiny_llama(), CharTokenizer()))


def run(*args):
    return CliRunner().invoke(main, ["eval", "--backend", "torch", *args])


def assert_usage_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and fragment in lines[0], result.output
    assert "Traceback" not in result.output


def test_end_to_end_on_the_tiny_model(tiny, tmp_path):
    out_json, out_png = tmp_path / "eval.json", tmp_path / "eval.png"
    result = run("--tasks", "niah_single,vt,kl,attn", "--budgets", "16", "--context", "900", "--samples", "1",
                 "--n-tail", "16", "--page-size", "8", "--n-features", "16", "--kl-tokens", "6",
                 "--selection", "exact", "--feature-map", "prf", "--json", str(out_json), "--plot", str(out_png))
    assert result.exit_code == 0, result.output
    assert "niah_single" in result.output and "KL" in result.output and "entropy tercile" in result.output
    report = json.loads(out_json.read_text())
    assert out_png.stat().st_size > 1000
    results = {(r["task"], r["method"], r["budget"]): r for r in report["results"]}
    assert len(results) == 4 * 4  # 4 tasks x (dense + 3 methods at one budget)
    assert results[("kl", "dense", None)]["kl"] == 0.0
    for task in ("niah_single", "vt", "kl", "attn"):
        reads = [results[(task, m, 16)]["read_fraction"] for m in ("sink-tail", "topk", "topk+phi")]
        assert max(reads) - min(reads) < 0.01, (task, reads)  # matched token-equivalent reads
        assert results[(task, "dense", None)]["read_fraction"] == 1.0
    assert results[("niah_single", "topk", 16)]["top_k"] > 16  # the summary's share as extra tokens
    assert results[("niah_single", "sink-tail", 16)]["n_tail"] > 16 + 16  # ... or as a longer tail
    assert 0.0 <= results[("niah_single", "dense", None)]["score"] <= 100.0
    assert set(results[("attn", "topk+phi", 16)]["terciles"]) == {"low", "mid", "high"}


def test_full_budget_methods_equal_dense(tiny):
    """With a budget covering the whole mid, every method is exact attention: the same answers as dense."""
    from tests.integrations.test_hf import tiny_llama

    runner = resolve_runtime("torch").runner(tiny_llama(), CharTokenizer())
    spec = EvalSpec(methods=["topk", "topk+phi"], budgets=[2048], tasks=["niah_single", "kl"], contexts=[700],
                    samples=1, base=topkphi.Config(feature_map="prf", n_sink=4, n_tail=16, selection="exact"),
                        kl_tokens=4)
    rows = evaluate(runner, spec)["rows"]
    answers = {r["method"]: r["prediction"] for r in rows if r["task"] == "niah_single"}
    assert answers["topk"] == answers["topk+phi"] == answers["dense"]
    assert all(r["kl"] < 1e-9 for r in rows if r["task"] == "kl")


def test_matched_reads_arithmetic():
    base = topkphi.Config(feature_map="prf", n_sink=4, n_tail=64, selection="page", page_size=16, n_features=64)
    phi, top, sink = (policy(m, 64, base, 2048, 64, 64) for m in ("topk+phi", "topk", "sink-tail"))
    assert top.cfg.top_k == 64 + 33 and top.cfg.feature_map is None  # ceil(64 * 65 / 128)
    assert sink.cfg.n_tail == int(-(-phi.planned_reads // 1)) - 4 and sink.planned_reads >= phi.planned_reads


@pytest.mark.parametrize("args, fragment", [
    (["--tasks", "niah_foo"], "unknown task"),
    (["--methods", "dense,magic"], "unknown method"),
    (["--budgets", "0"], "budgets must be >= 1"),
    (["--budgets", "x"], "takes integers"),
    (["--context", "60"], "not longer than sink + tail"),
    (["--samples", "0"], "--samples"),
    (["--context", "100"], "every budget covers the whole mid"),
    (["--plot", "eval.svg"], "does not end in .png"),
    (["--feature-map", "none"], "Top-K only"),
    (["--feature-map", "learned", "--phi-file", "nope.safetensors"], "no such phi file"),
])
def test_bad_input_is_one_line_before_the_model_loads(no_model, args, fragment):
    assert_usage_error(run(*args), fragment)


@pytest.fixture
def no_model(monkeypatch):
    import topkphi.models.resolve as resolve

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(resolve, "load_torch_model", refuse)


def test_plot_without_matplotlib_fails_before_the_model_loads(no_model, monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert_usage_error(run("--plot", str(tmp_path / "eval.png")), "--plot needs matplotlib")


def test_budgets_covering_some_contexts_are_named(tiny):
    """Budget 256 covers the mid of a 250-token context (every method is dense there): said, not silent."""
    result = run("--tasks", "kl", "--budgets", "16,256", "--context", "250", "--samples", "1", "--n-tail", "16",
                 "--kl-tokens", "2", "--methods", "topk")
    assert result.exit_code == 0, result.output
    assert "budget 256 covers the whole mid" in result.stderr and "budget 16 covers" not in result.stderr


def test_long_text_is_encoded_without_the_too_long_warning(monkeypatch):
    """The runner tokenizes through ``encode_long`` (issue 22, item 10)."""
    import topkphi.evaluation.runners as runners
    from tests.integrations.test_hf import tiny_llama

    seen = []
    monkeypatch.setattr(runners, "encode_long", lambda tokenizer, text: seen.append(text) or [1, 2])
    runner = resolve_runtime("torch").runner(tiny_llama(), CharTokenizer())
    assert runner.encode("a long haystack") == [1, 2] and seen == ["a long haystack"]


def test_mlx_runner_on_the_tiny_model():
    pytest.importorskip("mlx_lm", reason="mlx and mlx-lm are not installed")
    from tests.integrations.test_mlx_lm import tiny_llama

    runner = resolve_runtime("mlx").runner(tiny_llama(), CharTokenizer())
    spec = EvalSpec(methods=["sink-tail", "topk+phi"], budgets=[16], tasks=["niah_single", "kl"], contexts=[600],
                    samples=1, base=topkphi.Config(selection="exact", feature_map="prf", n_sink=4, n_tail=16,
                                                   page_size=8, n_features=16), kl_tokens=3)
    results = {(r["task"], r["method"]): r for r in evaluate(runner, spec)["results"]}
    assert results[("kl", "dense")]["kl"] == 0.0 and results[("kl", "topk+phi")]["kl"] > 0.0
    assert abs(results[("kl", "sink-tail")]["read_fraction"] - results[("kl", "topk+phi")]["read_fraction"]) < 0.01


@pytest.mark.parametrize("fields", [dict(selection="compact", feature_map="compact"),
                                    dict(selection="exact", feature_map="cluster", n_clusters=8)])
def test_sessions_fit_from_the_prefills_own_query_rows(tiny, monkeypatch, fields):
    """A policy's session fits its summaries from the shared prefill's last query rows (SPEC 8), not from
    the first decode step's query alone; a budget covering mid stays dense."""
    from tests.integrations.test_hf import tiny_llama

    backend = topkphi.get_backend("torch")
    windows = []
    build = type(backend).build_summary

    def recording(self, k, v, cfg, queries=None):
        windows.append(None if queries is None else (queries.window, queries.end, k.shape[2]))
        return build(self, k, v, cfg, queries=queries)

    monkeypatch.setattr(type(backend), "build_summary", recording)
    runner = resolve_runtime("torch").runner(tiny_llama(), CharTokenizer())
    ids = [3 + i % 40 for i in range(300)]
    snapshot = runner.prefill(ids)
    cfg = topkphi.Config(n_sink=4, n_tail=16, top_k=32, **fields)
    pol = policy("topk+phi", 32, cfg, len(ids) + 1, runner.d, runner.dv)
    session = runner.session(snapshot, pol)
    logits = session.step(7)
    assert windows and all(w == (cfg.fit_window if len(ids) > cfg.fit_window else len(ids), 300, 301)
                           for w in windows)
    assert logits.shape[-1] > 0 and session.read_fraction() < 1.0
