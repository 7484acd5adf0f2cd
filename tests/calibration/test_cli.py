"""`topkphi calibrate` end to end on a tiny random Llama, and one-line errors for bad input."""

from __future__ import annotations

import importlib.util
import json

import pytest
from click.testing import CliRunner

from topkphi.cli import main

HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="calibration needs torch and transformers")


class CharTokenizer:
    def encode(self, text):
        return [ord(c) % 96 for c in text]


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    import topkphi.models.resolve as resolve
    from tests.integrations.test_hf import tiny_llama

    model = tiny_llama()
    monkeypatch.setattr(resolve, "load_torch_model", lambda spec, device="cpu", **kw: (model, CharTokenizer()))
    data = tmp_path / "text.txt"
    data.write_text("".join(chr(33 + (7 * i * i + 3 * i) % 90) for i in range(400)))
    return model, data


def run(*args):
    return CliRunner().invoke(main, ["calibrate", *args])


def assert_usage_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and fragment in lines[0], result.output
    assert "Traceback" not in result.output


SMALL = [
    "--backend",
    "torch",
    "--n-features",
    "8",
    "--n-tail",
    "16",
    "--top-k",
    "16",
    "--tokens",
    "300",
    "--steps",
    "20",
    "--stride",
    "4",
]


@needs_torch
def test_calibrate_then_load_and_evaluate(tiny, tmp_path):
    from topkphi.calibration.phi_file import load_phi, torch_fingerprint

    model, data = tiny
    out = tmp_path / "phi.safetensors"
    result = run("--model", "tiny", "--data", str(data), *SMALL, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "2 layers x 2 KV heads" in result.output
    maps, meta = load_phi(out, torch_fingerprint(model, "tiny"))
    assert len(maps) == 2 and meta.m == 8 and meta.top_k == 16 and meta.n_tail == 16 and meta.model_id == "tiny"
    assert all(after < before for before, after in zip(meta.extra["loss_before"], meta.extra["loss_after"]))

    report = tmp_path / "eval.json"
    result = run(
        "--model",
        "tiny",
        "--data",
        str(data),
        *SMALL,
        "--evaluate",
        str(out),
        "--n-queries",
        "2",
        "--per-prompt",
        "1",
        "--json",
        str(report),
    )
    assert result.exit_code == 0, result.output
    numbers = json.loads(report.read_text())
    assert numbers["top_k_matched"] > 16 and numbers["mean"]["err_phi"] > 0 and "err_phi_prompt" in numbers["mean"]


@needs_torch
def test_a_file_for_another_model_is_refused(tiny, tmp_path):
    import topkphi.models.resolve as resolve
    from tests.integrations.test_hf import tiny_llama

    _, data = tiny
    out = tmp_path / "phi.safetensors"
    assert run("--model", "tiny", "--data", str(data), *SMALL, "--out", str(out)).exit_code == 0
    resolve.load_torch_model = lambda spec, device="cpu", **kw: (tiny_llama(heads=4, kv_heads=4), CharTokenizer())
    assert_usage_error(run("--model", "tiny", "--data", str(data), *SMALL, "--evaluate", str(out)), "made for tiny")


@needs_torch
def test_corrupt_file_is_refused(tiny, tmp_path):
    _, data = tiny
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 40)
    assert_usage_error(run("--model", "tiny", "--data", str(data), *SMALL, "--evaluate", str(bad)), "phi file")


@needs_torch
@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--out", "x.safetensors", "--tokens", "50"], "too short"),
        (["--out", "x.safetensors", "--data", "/nonexistent/file.txt"], "no such data file"),
        (["--out", "x.safetensors", "--steps", "0"], "steps must be >= 1"),
        ([], "give --out FILE"),
        (["--out", "."], "is a directory"),
        (["--evaluate", "nope.safetensors"], "no such phi file"),
    ],
)
def test_bad_input_is_one_line_before_the_model_loads(tiny, monkeypatch, args, fragment):
    import topkphi.models.resolve as resolve

    _, data = tiny
    monkeypatch.setattr(resolve, "load_torch_model", lambda *a, **k: pytest.fail("the model loaded first"))
    extra = [] if "--data" in args else ["--data", str(data)]
    full = [a for a in SMALL if a not in ("--tokens", "300")] if "--tokens" in args else SMALL
    assert_usage_error(run("--model", "tiny", *extra, *full, *args), fragment)


def test_help_says_out_is_required():
    result = run("--help")
    assert "required, unless --evaluate" in " ".join(result.output.split())


@needs_torch
def test_out_folder_is_made(tiny, tmp_path):
    _, data = tiny
    out = tmp_path / "new" / "folder" / "phi.safetensors"
    assert run("--model", "tiny", "--data", str(data), *SMALL, "--out", str(out)).exit_code == 0
    assert out.is_file()


class ChatTokenizer(CharTokenizer):
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(33 + i) for i in ids)


@pytest.fixture
def chat_phi_file(tiny, tmp_path, monkeypatch):
    """A phi file calibrated for the tiny model, which then loads with a tokenizer that decodes (for chat)."""
    import topkphi.models.resolve as resolve

    model, data = tiny
    out = tmp_path / "phi.safetensors"
    assert run("--model", "tiny", "--data", str(data), *SMALL, "--out", str(out)).exit_code == 0
    monkeypatch.setattr(resolve, "load_torch_model", lambda spec, device="cpu", **kw: (model, ChatTokenizer()))
    return out


@needs_torch
def test_chat_decodes_with_the_learned_maps(chat_phi_file):
    import topkphi
    from topkphi.commands.chat import load_engine

    out = chat_phi_file
    cfg = topkphi.Config(n_sink=4, n_tail=16, top_k=16, feature_map=None)
    engine, _ = load_engine("tiny", "torch", cfg, dense=False, phi_file=str(out))
    assert [engine.cfg(i).feature_map.kind for i in range(2)] == ["learned", "learned"]
    tokens = engine.generate(ChatTokenizer().encode("x" * 120), 6)
    assert len(tokens) == 6 and engine.stats.rho > 0  # the learned completion took part
    result = CliRunner().invoke(main, ["chat", "--model", "tiny", "--backend", "torch", "--feature-map", "learned",
                                       "--phi-file", str(out), "--n-tail", "16", "--top-k", "16", "--max-tokens", "3",
                                       "-p", "y" * 120])
    assert result.exit_code == 0, result.output
    assert "rho" in result.output


@needs_torch
def test_chat_fits_maps_on_the_prompt(chat_phi_file):
    """--feature-map learned-prompt: the stats line reports the fit; warm start from a file; bad input is one line."""
    out = chat_phi_file
    args = ["chat", "--model", "tiny", "--backend", "torch", "--feature-map", "learned-prompt", "--fit-steps", "2",
            "--n-tail", "16", "--top-k", "16", "--max-tokens", "3"]
    for extra in ([], ["--phi-file", str(out)]):
        result = CliRunner().invoke(main, [*args, *extra, "-p", "y" * 150])
        assert result.exit_code == 0, result.output
        assert "fitting phi" in result.output and "phi fit" in result.output and "rho" in result.output
    short = CliRunner().invoke(main, [*args, "-p", "y" * 20])
    assert short.exit_code == 0 and "too short" in short.output and "phi fit" not in short.output
    assert "fitting phi" not in short.output  # announced only when a fit runs
    bad = CliRunner().invoke(main, [*args[:6], "--fit-seconds", "0", "-p", "hi"])
    assert bad.exit_code == 2 and "--fit-seconds" in bad.output and "Traceback" not in bad.output
    # the other model commands do not prefill prompts of their own: the choice is chat's
    assert CliRunner().invoke(main, ["inspect-heads", "--feature-map", "learned-prompt"]).exit_code == 2


@needs_torch
def test_inspect_heads_reads_the_learned_maps(tiny, tmp_path):
    data = tiny[1]
    out = tmp_path / "phi.safetensors"
    assert run("--model", "tiny", "--data", str(data), *SMALL, "--out", str(out)).exit_code == 0
    text = data.read_text()[:150]
    args = ["inspect-heads", "--model", "tiny", "--backend", "torch", "--text", text, "--n-tail", "16", "--top-k", "16",
            "--n-queries", "2", "--json", "-"]
    learned = CliRunner().invoke(main, [*args, "--feature-map", "learned", "--phi-file", str(out)])
    assert learned.exit_code == 0, learned.output
    report = json.loads(learned.stdout)
    assert report["config"]["phi_file"] == str(out) and report["config"]["n_features"] == 8
    prf = json.loads(CliRunner().invoke(main, args).stdout)
    # the learned maps change the completion's estimate, so its error differs from the prf run's
    assert [h["err_phi"] for h in report["heads"]] != [h["err_phi"] for h in prf["heads"]]
    missing = CliRunner().invoke(main, [*args, "--feature-map", "learned"])
    assert missing.exit_code == 2 and "--phi-file" in missing.output


@needs_torch
def test_validation_tied_fit_and_kl_evaluation(tiny, tmp_path):
    from topkphi.calibration.phi_file import load_phi, torch_fingerprint

    model, data = tiny
    other = tmp_path / "other.txt"
    other.write_text("".join(chr(33 + (5 * i * i + 11 * i) % 90) for i in range(400)))
    out = tmp_path / "phi.safetensors"
    args = ["--model", "tiny", "--data", str(data), "--data", str(other), *SMALL]
    result = run(*args, "--sequences", "2", "--validation", "1", "--tie", "--extra-top-k", "24", "--out", str(out))
    assert result.exit_code == 0, result.output
    maps, meta = load_phi(out, torch_fingerprint(model, "tiny"))
    assert meta.extra["validation"] == 1 and meta.extra["extra_top_k"] == [24] and meta.extra["tie"]
    assert all(v is not None for v in meta.extra["val_after"])
    assert all((f.w_q == f.w_k).all() for f in maps)
    assert_usage_error(run(*args, "--sequences", "2", "--validation", "2", "--out", str(out)), "--validation 2")

    report = tmp_path / "eval.json"
    result = run(*args, "--evaluate", str(out), "--n-queries", "2", "--kl-tokens", "3", "--per-prompt", "1",
                 "--per-prompt-queries", "64", "--json", str(report))
    assert result.exit_code == 0, result.output
    mean = json.loads(report.read_text())["mean"]
    assert {"kl_top_k_matched", "kl_phi", "kl_phi_prompt"} <= set(mean)
    assert all(mean[k] >= 0 for k in ("kl_top_k_matched", "kl_phi", "kl_phi_prompt"))
    assert mean["kl_phi"] != mean["kl_top_k_matched"]  # the maps took part in the decode
    assert "KL ratio" in result.output
