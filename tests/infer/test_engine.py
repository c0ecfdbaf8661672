"""Engine: continuous batching over the paged cache gives exactly what one-at-a-time generation gives."""

from __future__ import annotations

import asyncio

import pytest
import torch

from pagoda.errors import ContextLengthError, InvalidRequestError, QueueFullError
from pagoda.infer.engine import AsyncEngine, Engine, EngineConfig
from pagoda.infer.generate import generate_tokens
from pagoda.infer.sampling import SamplingParams
from pagoda.model.config import ModelConfig
from pagoda.model.transformer import Transformer

EOS = frozenset({1})


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-llama", init_std=0.2)
    return Transformer(cfg).eval()


def reference(model, prompt, params) -> list[int]:
    """Tokens from the simple contiguous-cache loop, one prompt at a time."""
    return [e[0].token_id for e in generate_tokens(model, [prompt], [params], EOS)]


def run_all(engine: Engine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for t in engine.step():
            out.setdefault(t.request_id, []).append(t.token_id)
    return out


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 500, (int(torch.randint(1, 60, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


@pytest.mark.parametrize("config", [
    EngineConfig(),  # everything fits
    EngineConfig(max_step_tokens=16),  # long prompts prefill in chunks while others decode
    EngineConfig(max_running=3),  # a waiting queue forms; requests join as others finish
    EngineConfig(kv_cache_tokens=160, block_size=8),  # too few blocks: queueing and preemption
])
def test_continuous_batching_matches_one_at_a_time(model, config):
    engine = Engine(model, EOS, config)
    params = [SamplingParams(temperature=0, max_tokens=24),
              SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=20)]
    requests = {f"r{i}": (p, params[i % 2]) for i, p in enumerate(prompts(8))}
    for rid, (p, sp) in requests.items():
        engine.add_request(rid, p, sp)
    got = run_all(engine)
    for rid, (p, sp) in requests.items():
        assert got[rid] == reference(model, p, sp), rid
    stats = engine.stats
    assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0)


def test_requests_join_a_running_batch(model):
    engine = Engine(model, EOS)
    first, second = prompts(2, seed=3)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine.add_request("a", first, sp)
    got = {"a": [t.token_id for t in engine.step()]}
    for _ in range(3):
        got["a"] += [t.token_id for t in engine.step()]
    engine.add_request("b", second, sp)  # joins between decode steps
    for rid, toks in run_all(engine).items():
        got.setdefault(rid, []).extend(toks)
    assert got["a"] == reference(model, first, sp)
    assert got["b"] == reference(model, second, sp)


def test_abort_frees_blocks_immediately(model):
    engine = Engine(model, EOS, EngineConfig(block_size=4))
    engine.add_request("x", prompts(1)[0], SamplingParams(temperature=0, max_tokens=50))
    engine.step()
    assert engine.stats.kv_blocks_used > 0
    engine.abort("x")
    assert engine.stats.kv_blocks_used == 0 and not engine.has_unfinished()


def test_request_errors(model):
    engine = Engine(model, EOS, EngineConfig(max_waiting=1, kv_cache_tokens=64))
    with pytest.raises(InvalidRequestError):
        engine.add_request("e", [], SamplingParams())
    with pytest.raises(ContextLengthError):
        engine.add_request("c", [5] * 300, SamplingParams())
    with pytest.raises(InvalidRequestError, match="KV cache"):
        engine.add_request("k", [5] * 10, SamplingParams(max_tokens=100))
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.add_request("v", [10_000], SamplingParams(max_tokens=1))
    engine.add_request("ok", [5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(QueueFullError):
        engine.add_request("full", [5, 6], SamplingParams(max_tokens=2))


def test_async_engine_streams_and_cancels(model):
    async def main():
        engine = AsyncEngine(Engine(model, EOS))
        try:
            sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
            p = prompts(1, seed=5)[0]
            outs = [o async for o in engine.generate(p, sp)]
            assert [o.token_id for o in outs] == reference(model, p, sp)
            assert outs[-1].finish_reason == "length"
            stream = engine.generate(p, SamplingParams(temperature=0, max_tokens=200))
            await stream.__anext__()
            await stream.aclose()  # the client went away
            for _ in range(100):
                if engine.stats.kv_blocks_used == 0 and engine.stats.running == 0:
                    break
                await asyncio.sleep(0.02)
            assert engine.stats.kv_blocks_used == 0
        finally:
            engine.shutdown()

    asyncio.run(main())


# ---------------------------------------------------------------------- LoRA adapters per request
def test_prefix_cache_reuses_shared_prompt_blocks(model):
    """Requests sharing a prefix with earlier ones prefill only the rest and give the same tokens
    as without the cache; cached blocks outlive their sequences until the pool needs them."""
    g = torch.Generator().manual_seed(5)
    system = torch.randint(2, 500, (37,), generator=g).tolist()  # 4 full blocks of 8 + 5
    asks = [torch.randint(2, 500, (n,), generator=g).tolist() for n in (9, 3, 20, 1)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine = Engine(model, EOS, EngineConfig(block_size=8, kv_cache_tokens=256))
    plain = Engine(model, EOS, EngineConfig(block_size=8, kv_cache_tokens=256,
                                            prefix_caching=False))
    for i, ask in enumerate(asks):
        for e in (engine, plain):
            e.add_request(f"r{i}", system + ask, params)
        assert run_all(engine) == run_all(plain)  # one after the other: each reuses the last
        assert plain.scheduler.reused_tokens == 0
    assert engine.scheduler.reused_tokens == 3 * 32  # the system prompt's 4 full blocks
    assert engine.stats.kv_blocks_used == 0 and engine.stats.kv_blocks_cached > 0
    assert engine.stats.prefix_cache_hit_rate == pytest.approx(96 / (4 * 37 + 33))
    # a whole prompt seen before: everything but its last token comes from the cache
    engine.add_request("again", system + asks[2], params)
    plain.add_request("again", system + asks[2], params)
    assert run_all(engine) == run_all(plain)
    assert engine.scheduler.reused_tokens == 96 + 56  # 7 full blocks of the 57 tokens
    # new work evicts unused cached blocks when the free list runs dry, and nothing leaks
    for i, p in enumerate(prompts(6, seed=9)):
        engine.add_request(f"n{i}", p, params)
    run_all(engine)
    assert engine.stats.kv_blocks_used == 0


def test_prefix_cache_keeps_adapters_apart(adapted):
    """The same tokens under another adapter are other keys and values: never shared; and a
    reloaded adapter name forgets what was cached for it."""
    import copy

    base, adapters = adapted
    engine = Engine(copy.deepcopy(base), EOS, EngineConfig(block_size=4))
    engine.add_adapter("a", adapters["a"])
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    prompt = list(range(2, 30))
    got = {}
    for rid, adapter in (("base", None), ("a", "a"), ("a2", "a")):
        engine.admit(engine.prepare(rid, prompt, params, adapter))
        got.update(run_all(engine))
    assert got["a"] == got["a2"] == reference(with_adapter(base, adapters["a"], "a"), prompt,
                                              params)
    assert got["base"] == reference(base, prompt, params)
    assert engine.scheduler.reused_tokens == 24  # only "a2" reused, from "a": 6 blocks of 4
    engine.remove_adapter("a")
    engine.add_adapter("a", adapters["b"])  # same name, other weights
    engine.admit(engine.prepare("b", prompt, params, "a"))
    assert run_all(engine)["b"] == reference(with_adapter(base, adapters["b"], "b"), prompt,
                                             params)
    assert engine.scheduler.reused_tokens == 24


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, random_adapter):
    """A fresh base model (not the shared one) and two adapters for it."""
    from pagoda.model.lora import load_adapter

    torch.manual_seed(1)
    base = Transformer(ModelConfig.from_name("tiny-llama", init_std=0.2)).eval()
    root = tmp_path_factory.mktemp("adapters")
    return base, {name: load_adapter(random_adapter(base, root / name, seed))
                  for seed, name in enumerate(("a", "b"))}


def with_adapter(base: Transformer, adapter, name: str) -> Transformer:
    import copy

    from pagoda.model.lora import attach_adapter, set_active_adapter

    model = copy.deepcopy(base)
    attach_adapter(model, adapter, name)
    set_active_adapter(model, name)
    return model


@pytest.mark.parametrize("config", [EngineConfig(), EngineConfig(max_step_tokens=16)])
def test_requests_for_different_adapters_share_one_batch(adapted, config):
    import copy

    base, adapters = adapted
    engine = Engine(copy.deepcopy(base), EOS, config)
    for name, adapter in adapters.items():
        engine.add_adapter(name, adapter)
    assert engine.adapters == ["a", "b"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    requests = {f"r{i}": (p, [None, "a", "b"][i % 3]) for i, p in enumerate(prompts(6, seed=3))}
    for rid, (p, adapter) in requests.items():
        engine.add_request(rid, p, params) if adapter is None else engine.admit(
            engine.prepare(rid, p, params, adapter))
    got = run_all(engine)
    models = {None: base, **{n: with_adapter(base, a, n) for n, a in adapters.items()}}
    for rid, (p, adapter) in requests.items():
        assert got[rid] == reference(models[adapter], p, params), (rid, adapter)
    assert got["r1"] != reference(base, requests["r1"][0], params)  # the adapter matters


def test_adapter_errors_and_unloading(adapted):
    import copy

    from pagoda.errors import ModelNotFoundError
    from pagoda.infer.engine import AdapterInUseError

    base, adapters = adapted
    engine = Engine(copy.deepcopy(base), EOS)
    with pytest.raises(ModelNotFoundError, match="no LoRA adapter named 'a'"):
        engine.prepare("x", [5, 6], SamplingParams(max_tokens=2), "a")
    engine.add_adapter("a", adapters["a"])
    with pytest.raises(InvalidRequestError, match="already loaded"):
        engine.add_adapter("a", adapters["a"])
    engine.admit(engine.prepare("x", [5, 6], SamplingParams(max_tokens=3), "a"))
    with pytest.raises(AdapterInUseError, match="in use by 1"):
        engine.remove_adapter("a")
    run_all(engine)
    engine.remove_adapter("a")
    assert engine.adapters == []
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(engine.model(ids), base(ids))  # the base is back


def test_async_engine_loads_adapters_between_steps(adapted):
    import copy

    base, adapters = adapted
    engine = AsyncEngine(Engine(copy.deepcopy(base), EOS))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    async def go():
        await engine.call(lambda e: e.add_adapter("b", adapters["b"]))
        with pytest.raises(InvalidRequestError, match="already loaded"):
            await engine.call(lambda e: e.add_adapter("b", adapters["b"]))
        return [out.token_id async for out in engine.generate([7, 8, 9], params, adapter="b")]

    try:
        got = asyncio.run(go())
    finally:
        engine.shutdown()
    assert got == reference(with_adapter(base, adapters["b"], "b"), [7, 8, 9], params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_on_cuda_matches_the_cpu(model, monkeypatch):
    """Continuous batching over the paged cache on a GPU (no native kernels there) gives the
    CPU engine's greedy tokens."""
    import copy

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    gpu = copy.deepcopy(model).cuda()
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    got = {}
    for name, m in (("cpu", model), ("cuda", gpu)):
        engine = Engine(m, EOS, EngineConfig(max_step_tokens=32))
        for i, p in enumerate(prompts(6, seed=5)):
            engine.add_request(f"r{i}", p, sp)
        got[name] = run_all(engine)
    assert got["cuda"] == got["cpu"]
