"""HF transformers integration on a tiny random Llama: exactness at full budget, clean enable/disable."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the HF integration needs torch (pip install 'topkphi[torch]')")
transformers = pytest.importorskip("transformers", reason="the HF integration needs transformers")

import topkphi  # noqa: E402
from topkphi.generation.torch_engine import TorchEngine  # noqa: E402
from topkphi.integrations.hf import TopKPhiCache, TopKPhiLayer, cache_kwargs, topkphi_attention  # noqa: E402


class DigitTokenizer:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def tiny_llama(seed: int = 0, heads: int = 4, kv_heads: int = 2):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      max_position_embeddings=2048)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 96, (260,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.mark.parametrize("selection", ["exact", "page"])
def test_full_budget_gives_dense_greedy_tokens(model, prompt, selection):
    dense = TorchEngine(model, DigitTokenizer(), None, None).generate(prompt, 24)
    cfg = topkphi.Config(n_sink=4, n_tail=16, top_k=4096, selection=selection)
    engine = TorchEngine(model, DigitTokenizer(), cfg, topkphi.get_backend("torch"))
    assert engine.generate(prompt, 24) == dense
    assert engine.stats.rho == 0.0 and engine.stats.read_fraction == pytest.approx(1.0)


def test_decode_steps_match_the_oracle(model, prompt):
    """A small budget really runs topkphi: each layer's decode equals the oracle on the same cache."""
    cfg = topkphi.Config(n_sink=4, n_tail=16, top_k=24, selection="page", page_size=8)
    cache = TopKPhiCache(model, cfg, topkphi.get_backend("torch"))
    seen = []
    original = TopKPhiLayer.decode

    def spy(self, query, keys, values):
        out = original(self, query, keys, values)
        seen.append((query.double().numpy(), keys.double().numpy(), values.double().numpy(), self.cfg,
                     out.double().numpy()))
        return out

    oracle = topkphi.get_backend("numpy")
    with torch.inference_mode(), topkphi_attention(model):
        TopKPhiLayer.decode = spy
        try:
            model(input_ids=torch.tensor([prompt]), **cache_kwargs(model, cache))
            model(input_ids=torch.tensor([[5]]), **cache_kwargs(model, cache))
        finally:
            TopKPhiLayer.decode = original
    assert len(seen) == 2  # one decode per layer
    for q, k, v, layer_cfg, out in seen:
        summary = oracle.build_summary(k, v, layer_cfg)
        ref, stats = oracle.decode(q, k, v, summary, layer_cfg)
        assert abs(stats.rho).max() > 0  # the completion took part
        assert float(((out - ref) ** 2).sum() ** 0.5 / (ref**2).sum() ** 0.5) < 1e-4


def test_summary_is_folded_incrementally(model, prompt):
    cfg = topkphi.Config(n_sink=4, n_tail=16, top_k=32)
    engine = TorchEngine(model, DigitTokenizer(), cfg, topkphi.get_backend("torch"))
    engine.generate(prompt, 8)
    layer = engine.cache.layers[0]
    assert layer.summary.n_tokens == layer.get_seq_length() == len(prompt) + 7  # the reply but its last token
    assert layer.summary.mid_end == layer.get_seq_length() - 16


def test_multi_turn_reuses_and_crops_the_cache(model, prompt):
    cfg = topkphi.Config(n_sink=4, n_tail=16, top_k=4096)
    engine = TorchEngine(model, DigitTokenizer(), cfg, topkphi.get_backend("torch"))
    first = engine.generate(prompt, 6)
    turn2 = prompt + first + [3, 4, 5]
    list(engine.stream(turn2, max_tokens=6))
    assert engine.stats.prompt_tokens == 4  # only the new tokens and the last reply token ran
    fresh = TorchEngine(model, DigitTokenizer(), None, None).generate(turn2, 6)
    assert engine.tokens[len(turn2):] == fresh
    edited = prompt[:100] + [7, 7]  # diverges inside the cache: crop, rebuild the summary
    list(engine.stream(edited, max_tokens=4))
    assert engine.stats.prompt_tokens == 2
    assert engine.tokens[len(edited):] == TorchEngine(model, DigitTokenizer(), None, None).generate(edited, 4)


def test_enable_and_disable_leave_no_trace(prompt):
    a, b = tiny_llama(1), tiny_llama(2)
    before = (a.config._attn_implementation, b.config._attn_implementation)
    with topkphi_attention(a):
        assert a.config._attn_implementation == "topkphi"
        assert b.config._attn_implementation == before[1]  # the other model is untouched
    assert (a.config._attn_implementation, b.config._attn_implementation) == before
    # a plain cache under topkphi routing is exact attention
    with torch.inference_mode():
        ids = torch.tensor([prompt[:50]])
        ref = a(input_ids=ids).logits
        with topkphi_attention(a):
            got = a(input_ids=ids, **cache_kwargs(a, transformers.DynamicCache(config=a.config))).logits
    torch.testing.assert_close(got, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton page path needs a CUDA GPU")
def test_triton_engine_on_cuda_chained_and_plain_launches_agree(prompt, monkeypatch):
    """The whole chat loop on the GPU (bf16, Triton page path with small budgets, every decode step's
    kernels chained where the GPU allows it) gives the same tokens and statistics as plain launches,
    and the full budget (fp32) still gives dense's tokens."""
    model = tiny_llama(3).to("cuda", torch.bfloat16)
    monkeypatch.setenv("TOPKPHI_STRICT", "1")  # a kernel failure raises instead of falling back to torch
    cfg = topkphi.Config(n_sink=4, n_tail=16, top_k=24, selection="page", page_size=8)
    runs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("TOPKPHI_PDL", flag)
        engine = TorchEngine(model, DigitTokenizer(), cfg, topkphi.get_backend("triton"))
        runs[flag] = (engine.generate(prompt, 16), engine.stats.rho, engine.stats.read_fraction)
    assert runs["0"] == runs["1"]
    assert 0.0 < runs["1"][1] and runs["1"][2] < 0.9  # the completion ran on a partial read set
    model = model.float()  # fp32, so that exact attention and dense agree to the last greedy token
    dense = TorchEngine(model, DigitTokenizer(), None, None).generate(prompt, 16)
    full = topkphi.Config(n_sink=4, n_tail=16, top_k=4096, selection="page")
    assert TorchEngine(model, DigitTokenizer(), full, topkphi.get_backend("triton")).generate(prompt, 16) == dense
