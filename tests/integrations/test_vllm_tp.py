"""topkphi inside vLLM with tensor parallel size 2 on the CPU: each rank decodes its own KV heads.

SmolLM2-135M has 9 query heads, which vLLM cannot split in two (its own message is checked), so
the TP=2 run uses the default model cut to 6 query and 2 KV heads (its first two head groups):
the real weights, degraded but deterministic. Runs where vLLM is installed (``bash .ci/vllm``).
"""

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here; its tests run in their own environment "
                                          "(bash .ci/vllm)")
torch = pytest.importorskip("torch")

from tests.integrations.test_vllm_engine import CFG, ENGINE, GREEDY, PROMPTS, _shutdown, _tokens  # noqa: E402
from topkphi.integrations.vllm import engine_kwargs  # noqa: E402
from topkphi.models.resolve import resolve_model  # noqa: E402

pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallel size 2 needs 2 cores")


@pytest.fixture(scope="module")
def model_path():
    return str(resolve_model("smollm2-135m", "torch").path)


def test_the_default_model_cannot_be_split_in_two(model_path):
    with pytest.raises(Exception, match=r"Total number of attention heads \(9\) must be divisible by tensor "
                                        r"parallel size \(2\)"):
        vllm.LLM(model_path, **ENGINE, tensor_parallel_size=2)


@pytest.fixture(scope="module")
def six_heads(model_path, tmp_path_factory):
    """The default model keeping query heads 0-5 and KV heads 0-1 (GQA groups of 3)."""
    from safetensors.torch import load_file, save_file

    src, dst = model_path, tmp_path_factory.mktemp("smollm2-6h")
    config = json.load(open(os.path.join(src, "config.json")))
    d = config["head_dim"]
    weights = {}
    for name in os.listdir(src):
        if name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(src, name)))
        elif name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(os.path.join(src, name), dst)
    for name, w in weights.items():
        if name.endswith("q_proj.weight"):
            weights[name] = w[: 6 * d].contiguous()
        elif name.endswith(("k_proj.weight", "v_proj.weight")):
            weights[name] = w[: 2 * d].contiguous()
        elif name.endswith("o_proj.weight"):
            weights[name] = w[:, : 6 * d].contiguous()
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config.update(num_attention_heads=6, num_key_value_heads=2)
    json.dump(config, open(dst / "config.json", "w"))
    return str(dst)


@pytest.fixture(scope="module")
def bound_threads():
    """vLLM's CPU workers bind one thread each; with one NUMA node it asks to be told which cores."""
    old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    yield
    if old is None:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND")
    else:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old


def test_tensor_parallel_2_equals_vllms_own_backend(six_heads, bound_threads):
    kwargs = dict(ENGINE, tensor_parallel_size=2, kv_cache_memory_bytes=1 << 29)
    llm = vllm.LLM(six_heads, **kwargs)
    expected = _tokens(llm.generate(PROMPTS, GREEDY))
    _shutdown(llm)
    llm = vllm.LLM(six_heads, **kwargs, **engine_kwargs(CFG))
    got = _tokens(llm.generate(PROMPTS, GREEDY))
    per_rank = llm.collective_rpc("topkphi_stats")
    _shutdown(llm)
    assert got == expected
    assert len(per_rank) == 2  # one worker per rank, each decoding its own KV head
    assert all(s["rows"] == 30 * sum(len(t) - 1 for t in got) for s in per_rank)
