"""`topkphi eval --feature-map learned --phi-file F`: matched reads count the learned maps' query-side
parameters (SPEC section 6), the maps reach every layer's decode (torch and mlx), and bad files are one line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("safetensors", reason="phi files are safetensors")

import topkphi  # noqa: E402
from topkphi.evaluation.harness import EvalSpec  # noqa: E402
from topkphi.evaluation.policies import policy  # noqa: E402
from topkphi.feature_maps import FeatureMap  # noqa: E402


def learned_maps(n_layers, n_kv, m, d, seed=0):
    rng = np.random.default_rng(seed)
    return [FeatureMap.learned(0.3 * rng.standard_normal((n_kv, m, d)), 0.1 * rng.standard_normal((n_kv, m)),
                               0.3 * rng.standard_normal((n_kv, m, d)), 0.1 * rng.standard_normal((n_kv, m)))
            for _ in range(n_layers)]


def write_phi(path, fp, m=8, seed=0):
    """A valid phi file for the model with fingerprint ``fp`` (random learned maps, as calibrate would save)."""
    from topkphi.calibration.phi_file import PhiMeta, save_phi

    maps = learned_maps(fp.n_layers, fp.n_kv_heads, m, fp.d, seed)
    meta = PhiMeta(model_id=fp.model_id, config_hash=fp.config_hash, weights_hash=fp.weights_hash,
                   n_layers=fp.n_layers, n_kv_heads=fp.n_kv_heads, d=fp.d, m=m, scale=fp.scale, n_sink=4, n_tail=16,
                   top_k=16)
    save_phi(path, maps, meta)
    return path


# ---------------------------------------------------------------- matched-reads arithmetic (no model)


def test_learned_maps_add_their_query_parameters_to_the_matched_reads():
    d = dv = 64
    m = 32
    base = topkphi.Config(n_sink=4, n_tail=64, selection="page", page_size=16, feature_map=None)
    maps = learned_maps(3, 2, m, d)
    phi, top, sink = (policy(meth, 64, base, 2048, d, dv, maps) for meth in ("topk+phi", "topk", "sink-tail"))
    summary = (m * (dv + 1) + m * (d + 1)) / (d + dv)  # (S, z) plus W_q, b_q per KV head
    assert top.cfg.top_k == 64 + math.ceil(summary) == 97 and top.cfg.feature_map is None
    assert top.layer_cfgs is None and sink.layer_cfgs is None  # one config serves every layer
    assert sink.cfg.n_tail == math.ceil(phi.planned_reads) - 4
    prf = policy("topk+phi", 64, base.replace(feature_map="prf", n_features=m), 2048, d, dv)
    assert phi.planned_reads - prf.planned_reads == pytest.approx(m * (d + 1) / (d + dv))
    # every layer decodes with its own map; the engines take `layer -> Config`
    assert [phi.engine_cfg(i).feature_map for i in range(3)] == maps
    assert phi.cfg.feature_map is maps[0] and phi.config(2).top_k == 64


def test_layers_with_different_map_sizes_get_their_own_matched_budget():
    d = dv = 64
    base = topkphi.Config(n_sink=4, n_tail=64, selection="exact", feature_map=None)
    maps = learned_maps(1, 2, 8, d) + learned_maps(1, 2, 64, d)
    top = policy("topk", 32, base, 4096, d, dv, maps)
    assert [top.config(i).top_k for i in range(2)] == [32 + math.ceil(8 * 130 / 128), 32 + math.ceil(64 * 130 / 128)]
    spec = EvalSpec(methods=["topk"], budgets=[32], tasks=["kl"], contexts=[4096], base=base, maps=maps)
    spec.validate()
    with pytest.raises(ValueError, match="learned"):
        EvalSpec(methods=["topk"], budgets=[32], tasks=["kl"], contexts=[4096], base=base,
                 maps=[FeatureMap.prf(d, 8)]).validate()


# ---------------------------------------------------------------- the command on the tiny models

pytest.importorskip("wonderwords", reason="the evaluation tasks need wonderwords")

from topkphi.cli import main  # noqa: E402


class CharTokenizer:
    eos_token_id = None

    def encode(self, text):
        return [ord(c) % 96 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + i % 95) for i in ids)


@pytest.fixture
def tiny_torch(monkeypatch, tmp_path):
    pytest.importorskip("transformers", reason="the command test runs the tiny torch Llama")
    import topkphi.models.resolve as resolve
    from tests.integrations.test_hf import tiny_llama
    from topkphi.calibration.phi_file import torch_fingerprint

    model = tiny_llama()
    monkeypatch.setattr(resolve, "load_torch_model", lambda spec, device="cpu", **kw: (model, CharTokenizer()))
    return write_phi(tmp_path / "phi.safetensors", torch_fingerprint(model, "tiny"))


ARGS = ["eval", "--model", "tiny", "--tasks", "niah_single,kl,attn", "--budgets", "16", "--context", "600",
        "--samples", "1", "--n-tail", "16", "--page-size", "8", "--kl-tokens", "4"]


def run(*args):
    return CliRunner().invoke(main, [*ARGS, *args])


def results(path):
    return {(r["task"], r["method"], r["budget"]): r for r in json.loads(path.read_text())["results"]}


def test_eval_with_a_phi_file(tiny_torch, tmp_path):
    learned, prf = tmp_path / "learned.json", tmp_path / "prf.json"
    result = run("--backend", "torch", "--selection", "exact", "--feature-map", "learned", "--phi-file",
                 str(tiny_torch), "--json",
                 str(learned), "--plot", str(tmp_path / "learned.png"))
    assert result.exit_code == 0, result.output
    assert "learned phi (m = 8), phi.safetensors" in " ".join(result.output.split())
    assert run("--backend", "torch", "--selection", "exact", "--feature-map", "prf", "--n-features", "8",
               "--json", str(prf)).exit_code == 0
    report = json.loads(learned.read_text())
    assert report["config"]["phi_file"] == str(tiny_torch) and report["config"]["n_features"] == 8
    got, ref = results(learned), results(prf)
    # d = 16: (S, z) is 8 * 17 / 32 = 4.25 token-equivalents; W_q, b_q add as much again
    assert got[("kl", "topk", 16)]["top_k"] == 16 + math.ceil(8.5) and ref[("kl", "topk", 16)]["top_k"] == 16 + 5
    assert got[("kl", "sink-tail", 16)]["n_tail"] > ref[("kl", "sink-tail", 16)]["n_tail"]
    for task in ("niah_single", "kl", "attn"):
        reads = [got[(task, m, 16)]["read_fraction"] for m in ("sink-tail", "topk", "topk+phi")]
        assert max(reads) - min(reads) < 0.01, (task, reads)  # matched, measured by the decode steps
    # the decode steps read the maps' parameters too, so topk+phi reads more than with prf at the same m
    extra = got[("kl", "topk+phi", 16)]["read_fraction"] - ref[("kl", "topk+phi", 16)]["read_fraction"]
    assert extra == pytest.approx(4.25 / 600, rel=0.1)
    # the learned maps, not prf, made the estimate
    assert got[("kl", "topk+phi", 16)]["kl"] != pytest.approx(ref[("kl", "topk+phi", 16)]["kl"], rel=1e-6)
    assert got[("attn", "topk+phi", 16)]["attn_err"] != pytest.approx(ref[("attn", "topk+phi", 16)]["attn_err"])
    assert got[("kl", "topk", 16)]["kl"] >= 0.0 and got[("kl", "dense", None)]["kl"] == 0.0


def assert_usage_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and fragment in lines[0], result.output
    assert "Traceback" not in result.output


def test_bad_phi_files_are_one_line(tiny_torch, tmp_path):
    from tests.integrations.test_hf import tiny_llama
    from topkphi.calibration.phi_file import torch_fingerprint

    learned = ["--backend", "torch", "--feature-map", "learned", "--phi-file"]
    assert_usage_error(run(*learned, str(tmp_path / "nope.safetensors")), "no such phi file")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(tiny_torch.read_bytes()[:200])
    assert_usage_error(run(*learned, str(corrupt)), "corrupt")
    other = write_phi(tmp_path / "other.safetensors", torch_fingerprint(tiny_llama(heads=2, kv_heads=1), "other"))
    assert_usage_error(run(*learned, str(other)), "made for other")
    assert_usage_error(run("--backend", "torch", "--selection", "exact", "--feature-map", "learned"), "--phi-file")
    assert_usage_error(run("--backend", "torch", "--phi-file", str(tiny_torch)), "--feature-map learned")


def test_eval_with_a_phi_file_on_mlx(monkeypatch, tmp_path):
    pytest.importorskip("mlx_lm", reason="mlx and mlx-lm are not installed")
    import topkphi.models.resolve as resolve
    from tests.integrations.test_mlx_lm import tiny_llama
    from topkphi.calibration.phi_file import mlx_fingerprint

    model = tiny_llama()
    monkeypatch.setattr(resolve, "load_mlx_model", lambda spec, **kw: (model, CharTokenizer()))
    phi = write_phi(tmp_path / "phi.safetensors", mlx_fingerprint(model, "tiny"))
    out = tmp_path / "mlx.json"
    result = run("--backend", "mlx", "--selection", "exact", "--feature-map", "learned", "--phi-file", str(phi),
                 "--json", str(out))
    assert result.exit_code == 0, result.output
    got = results(out)
    assert json.loads(out.read_text())["runtime"]["framework"] == "mlx"
    assert got[("kl", "topk", 16)]["top_k"] == 16 + 9 and got[("kl", "topk+phi", 16)]["kl"] > 0.0
    for task in ("niah_single", "kl", "attn"):
        reads = [got[(task, m, 16)]["read_fraction"] for m in ("sink-tail", "topk", "topk+phi")]
        assert max(reads) - min(reads) < 0.01, (task, reads)


def test_every_layer_gets_its_own_map(tiny_torch):
    """Swapping layer 1's map changes the attention error and the KL; layer 0's alone would not."""
    from tests.integrations.test_hf import tiny_llama
    from topkphi.commands.runtime import resolve_runtime
    from topkphi.evaluation.harness import evaluate

    runner = resolve_runtime("torch").runner(tiny_llama(), CharTokenizer())
    a, b = learned_maps(2, 2, 8, 16, seed=1), learned_maps(2, 2, 8, 16, seed=2)
    out = []
    for maps in ([a[0], a[1]], [a[0], b[1]]):
        spec = EvalSpec(methods=["topk+phi"], budgets=[16], tasks=["kl", "attn"], contexts=[500], samples=1,
                        base=topkphi.Config(selection="exact", n_sink=4, n_tail=16, page_size=8, feature_map=None),
                            kl_tokens=3,
                        maps=maps)
        out.append({r["task"]: r for r in evaluate(runner, spec)["results"] if r["method"] == "topk+phi"})
    assert out[0]["attn"]["attn_err"] != pytest.approx(out[1]["attn"]["attn_err"], rel=1e-9)
    assert out[0]["kl"]["kl"] != pytest.approx(out[1]["kl"]["kl"], rel=1e-9)
