"""LoRA layers on tiny random models: the update formula, merging, several adapters per layer,
per-token routing for batched serving, and PEFT's file layout against the real `peft`."""

import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from pagoda.errors import ConfigError, ModelNotFoundError, WeightsError
from pagoda.model.config import ModelConfig
from pagoda.model.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
from pagoda.model.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraConfig,
    LoRALinear,
    adapter_names,
    add_lora,
    attach_adapter,
    detach_adapter,
    load_adapter,
    lora_parameters,
    merge_and_unload,
    merge_lora,
    route_adapters,
    save_adapter,
    set_active_adapter,
    unmerge_lora,
)
from pagoda.model.quantized import QuantizedLinear, quantize_linears
from pagoda.model.transformer import Transformer

VOCAB = 300


def tiny(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny-llama", vocab_size=VOCAB, d_ff=128, n_kv_head=2, **kw)
    return Transformer(cfg).eval()


def randomize_lora(model: nn.Module, name: str = "default", seed: int = 1) -> None:
    """Give B (zero at init) and A random values so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def test_lora_linear_computes_base_plus_scaled_low_rank_update():
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=True)
    layer = LoRALinear(base).eval()
    layer.add_adapter("a", LoraConfig(r=4, alpha=6.0, dropout=0.3))
    A, B = layer.lora_A["a"], layer.lora_B["a"]
    assert A.shape == (4, 16) and B.shape == (12, 4)
    assert B.abs().sum() == 0 and A.abs().sum() > 0  # PEFT's init: the model starts unchanged
    bound = 1 / 16 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 16
    assert A.abs().max() <= bound
    with torch.no_grad():
        B.normal_()
    x = torch.randn(3, 5, 16)
    assert torch.equal(layer(x), base(x))  # no adapter active yet
    layer.active = "a"
    expected = base(x) + x @ A.T @ B.T * (6.0 / 4)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    layer.train()  # dropout hits the adapter's input only
    torch.manual_seed(1)
    y = layer(x)
    assert not torch.allclose(y, expected, atol=1e-3)
    assert torch.allclose(layer.base(x), base(x))


def test_rslora_scaling():
    assert LoraConfig(r=16, alpha=8.0, use_rslora=True).scaling == pytest.approx(2.0)
    assert LoraConfig(r=16, alpha=8.0).scaling == pytest.approx(0.5)


@pytest.mark.parametrize("kw", [dict(r=0), dict(alpha=0.0), dict(dropout=1.0),
                                dict(target_modules=())])
def test_bad_config_is_rejected(kw):
    with pytest.raises(ConfigError):
        LoraConfig(**kw)


def test_add_lora_wraps_targets_freezes_base_and_starts_as_identity():
    model = tiny()
    x = ids(2, 9)
    before = model(x)
    names = add_lora(model, LoraConfig(r=4))
    assert len(names) == 2 * 7 and "layers.1.ffn.down_proj" in names
    assert isinstance(model.layers[0].attn.q_proj, LoRALinear)
    assert torch.equal(model(x), before)
    trainable = [p for p in model.parameters() if p.requires_grad]
    lora = lora_parameters(model)
    assert len(lora) == 2 * len(names)
    assert {id(p) for p in trainable} == {id(p) for p in lora}
    assert model.embed.weight.requires_grad is False
    model.train()
    model.loss(x, x).backward()
    assert all(p.grad is not None for p in lora)
    assert model.layers[0].attn.q_proj.base.weight.grad is None


def test_add_lora_errors():
    model = tiny()
    with pytest.raises(ConfigError, match="no Linear layer matches"):
        add_lora(model, LoraConfig(target_modules=("nope",)))
    add_lora(model, LoraConfig(r=2, target_modules=("q_proj",)))
    with pytest.raises(ConfigError, match="already exists"):
        add_lora(model, LoraConfig(r=2))
    for bad in ("", "a.b", "keys"):
        with pytest.raises(ConfigError):
            add_lora(model, LoraConfig(r=2), name=bad)
    with pytest.raises(ModelNotFoundError, match="no LoRA adapter named 'x'"):
        lora_parameters(model, "x")


def test_merge_equals_unmerged_and_unmerge_restores():
    model = tiny()
    add_lora(model, LoraConfig(r=4, alpha=8.0))
    randomize_lora(model)
    x = ids(2, 12)
    with torch.no_grad():
        unmerged = model(x)
        base_q = model.layers[0].attn.q_proj.base.weight.clone()
        merge_lora(model)
        merged = model(x)
        assert (merged - unmerged).abs().max().item() <= 1e-4
        assert not torch.allclose(model.layers[0].attn.q_proj.base.weight, base_q)
        unmerge_lora(model)
        assert torch.allclose(model.layers[0].attn.q_proj.base.weight, base_q, atol=1e-6)
        assert (model(x) - unmerged).abs().max().item() <= 1e-4


def test_merge_and_unload_gives_plain_linears_that_export(tmp_path):
    model = tiny()
    add_lora(model, LoraConfig(r=4))
    randomize_lora(model)
    x = ids(1, 10)
    with torch.no_grad():
        expected = model(x)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert type(plain.layers[1].ffn.up_proj) is nn.Linear
    save_hf_checkpoint(plain, tmp_path)
    with torch.no_grad():
        assert (plain(x) - expected).abs().max().item() <= 1e-4
        assert (load_hf_checkpoint(tmp_path)(x) - expected).abs().max().item() <= 1e-4


def test_merge_refuses_quantized_base_and_tied_weights():
    model = tiny()
    quantize_linears(model, bits=8, group_size=32)
    add_lora(model, LoraConfig(r=2, target_modules=("q_proj",)))
    assert isinstance(model.layers[0].attn.q_proj.base, QuantizedLinear)
    with pytest.raises(ConfigError, match="quantized"):
        merge_lora(model)
    tied = tiny()  # tiny-llama ties lm_head to the embedding
    add_lora(tied, LoraConfig(r=2, target_modules=("lm_head",)))
    with pytest.raises(ConfigError, match="tied"):
        merge_lora(tied)


def test_several_adapters_switch_and_detach_restores_the_model():
    model = tiny()
    x = ids(2, 8)
    with torch.no_grad():
        base = model(x)
    add_lora(model, LoraConfig(r=4), name="a")
    randomize_lora(model, "a", seed=1)
    add_lora(model, LoraConfig(r=2, target_modules=("v_proj", "up_proj")), name="b")
    randomize_lora(model, "b", seed=2)
    assert adapter_names(model) == ["a", "b"]
    assert not any(p.requires_grad for p in lora_parameters(model, "a"))  # b trains, a frozen
    with torch.no_grad():
        out_b = model(x)
        set_active_adapter(model, "a")
        out_a = model(x)
        set_active_adapter(model, None)
        assert torch.equal(model(x), base)
    assert not torch.allclose(out_a, out_b)
    merge_lora(model, "a")
    with pytest.raises(ConfigError, match="merged"):
        set_active_adapter(model, "b")
    detach_adapter(model, "a")  # unmerges first
    with torch.no_grad():
        set_active_adapter(model, "b")
        assert torch.allclose(model(x), out_b, atol=1e-5)
    detach_adapter(model, "b")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.layers[0].attn.q_proj) is nn.Linear
    with torch.no_grad():
        assert torch.allclose(model(x), base, atol=1e-5)
    with pytest.raises(ModelNotFoundError):
        detach_adapter(model, "b")


def test_route_adapters_matches_each_row_run_alone():
    model = tiny()
    add_lora(model, LoraConfig(r=4), name="a")
    randomize_lora(model, "a", seed=1)
    add_lora(model, LoraConfig(r=3, target_modules=("q_proj", "v_proj", "down_proj")), name="b")
    randomize_lora(model, "b", seed=2)
    T = 7
    x = ids(3, T)
    choice = ["a", None, "b"]
    with torch.no_grad():
        alone = []
        for row, adapter in enumerate(choice):
            set_active_adapter(model, adapter)
            alone.append(model(x[row:row + 1]))
        set_active_adapter(model, "a")  # routing overrides the active adapter
        with route_adapters(model, [a for a in choice for _ in range(T)]) as routing:
            mixed = model(x)
        assert {a for a, _ in routing.groups} == {"a", "b"}
        for row in range(3):
            assert (mixed[row] - alone[row][0]).abs().max().item() <= 1e-5
        assert model.layers[0].attn.q_proj.routing is None  # restored after the block
        set_active_adapter(model, "b")
        all_b = model(x)
        set_active_adapter(model, None)
        with route_adapters(model, ["b"] * (3 * T)) as routing:  # one adapter for all rows
            assert routing.groups[0][1] is None  # no index ops needed
            assert torch.allclose(model(x), all_b, atol=1e-6)


def test_route_adapters_errors():
    model = tiny()
    add_lora(model, LoraConfig(r=2), name="a")
    with pytest.raises(ModelNotFoundError, match="'zz'"):
        with route_adapters(model, ["zz"]):
            pass
    with torch.no_grad(), pytest.raises(ConfigError, match="saw 10 rows"):
        with route_adapters(model, ["a"] * 4):
            model(ids(2, 5))
    assert model.layers[0].attn.q_proj.routing is None
    merge_lora(model, "a")
    with pytest.raises(ConfigError, match="merged"):
        with route_adapters(model, ["a"]):
            pass


def test_save_and_load_adapter_round_trip(tmp_path):
    model = tiny()
    add_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.1, target_modules=("q_proj", "v_proj")))
    randomize_lora(model)
    folder = save_adapter(model, tmp_path / "ad", base_model="tiny-llama")
    assert sorted(p.name for p in folder.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["bias"] == "none"
    assert config["base_model_name_or_path"] == "tiny-llama" and config["inference_mode"]
    keys = set(load_file(folder / ADAPTER_WEIGHTS))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 2 * 2
    adapter = load_adapter(folder)
    assert adapter.family == "llama" and adapter.config.r == 4 and adapter.base_model == "tiny-llama"
    assert adapter.config.target_modules == ("layers.0.attn.q_proj", "layers.0.attn.v_proj",
                                             "layers.1.attn.q_proj", "layers.1.attn.v_proj")
    assert (adapter.config.alpha, adapter.config.dropout) == (8.0, 0.1)
    A, B = adapter.tensors["layers.1.attn.v_proj"]
    assert torch.equal(A, model.layers[1].attn.v_proj.lora_A["default"])
    x = ids(2, 6)
    with torch.no_grad():
        expected = model(x)
    fresh = tiny()
    attach_adapter(fresh, adapter, "loaded")
    assert not any(p.requires_grad for p in lora_parameters(fresh, "loaded"))
    set_active_adapter(fresh, "loaded")
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


def test_partial_targets_are_saved_as_full_module_names(tmp_path):
    model = tiny()
    add_lora(model, LoraConfig(r=2, target_modules=("layers.1.attn.q_proj",)))
    config = json.loads((save_adapter(model, tmp_path) / ADAPTER_CONFIG).read_text())
    assert config["target_modules"] == ["model.layers.1.self_attn.q_proj"]


def _write_adapter(folder, config: dict, tensors: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config))
    save_file(tensors, folder / ADAPTER_WEIGHTS)


GOOD_KEY = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("change, tensors, message", [
    ({"peft_type": "PREFIX_TUNING"}, None, "only LORA"),
    ({"use_dora": True}, None, "use_dora"),
    ({"bias": "all"}, None, "bias='all'"),
    ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    ({"init_lora_weights": "pissa"}, None, "changes the base weights"),
    ({}, {GOOD_KEY + ".lora_A.weight": torch.zeros(2, 64)}, "not both"),
    ({}, {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector":
          torch.zeros(64)}, "not LoRA A/B weights"),
    ({}, {"base_model.model.model.layers.0.weird.lora_A.weight": torch.zeros(2, 64),
          "base_model.model.model.layers.0.weird.lora_B.weight": torch.zeros(64, 2)},
     "no equivalent"),
    ({}, {GOOD_KEY + ".lora_A.weight": torch.zeros(3, 64),
          GOOD_KEY + ".lora_B.weight": torch.zeros(64, 3)}, "not rank r=2"),
])
def test_load_adapter_rejects_what_it_cannot_reproduce(tmp_path, change, tensors, message):
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
              "bias": "none", **change}
    tensors = tensors or {GOOD_KEY + ".lora_A.weight": torch.zeros(2, 64),
                          GOOD_KEY + ".lora_B.weight": torch.zeros(64, 2)}
    _write_adapter(tmp_path, config, tensors)
    with pytest.raises(WeightsError, match=message):
        load_adapter(tmp_path)


def test_load_adapter_missing_files(tmp_path):
    with pytest.raises(ModelNotFoundError):
        load_adapter(tmp_path / "absent")
    with pytest.raises(WeightsError, match=ADAPTER_CONFIG):
        load_adapter(tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(WeightsError, match="safe_serialization"):
        load_adapter(tmp_path)
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(b"not safetensors")
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    with pytest.raises(WeightsError, match="corrupt"):
        load_adapter(tmp_path)


def test_attach_rejects_an_adapter_for_another_model(tmp_path):
    model = tiny()
    add_lora(model, LoraConfig(r=2))
    adapter = load_adapter(save_adapter(model, tmp_path))
    wider = tiny(d_model=96, n_head=4)
    with pytest.raises(WeightsError, match="trained on another base model"):
        attach_adapter(wider, adapter, "x")
    assert not any(isinstance(m, LoRALinear) for m in wider.modules())  # nothing half-attached
    deeper_adapter_model = tiny(n_layer=3)
    add_lora(deeper_adapter_model, LoraConfig(r=2))
    deep = load_adapter(save_adapter(deeper_adapter_model, tmp_path / "deep"))
    with pytest.raises(WeightsError, match="no layer layers.2"):
        attach_adapter(tiny(), deep, "x")
    with pytest.raises(ConfigError, match="already exists"):
        attach_adapter(model, adapter, "default")


# --- parity with Hugging Face peft ---------------------------------------------------------

def _hf_llama(folder):
    """A tiny random LlamaForCausalLM (GQA, untied head) saved to `folder`, and Pagoda's copy."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(folder)
    return hf, load_hf_checkpoint(folder)


def test_peft_loads_what_pagoda_saves(tmp_path):
    hf, ours = _hf_llama(tmp_path / "base")
    add_lora(ours, LoraConfig(r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj")))
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = ids(2, 16)
    with torch.no_grad():
        expected = peft_model(x).logits
        got = ours(x)
        with peft_model.disable_adapter():
            assert (got - peft_model(x).logits).abs().max().item() > 1e-2  # the adapter acts
    assert (got - expected).abs().max().item() <= 1e-4


def test_pagoda_loads_what_peft_saves(tmp_path):
    hf, ours = _hf_llama(tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"])
    peft_model = peft.get_peft_model(hf, config).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter = load_adapter(tmp_path / "adapter")
    assert adapter.config.r == 4 and len(adapter.tensors) == 2 * 5
    attach_adapter(ours, adapter, "peft")
    set_active_adapter(ours, "peft")
    x = ids(2, 16)
    with torch.no_grad():
        assert (ours(x) - peft_model(x).logits).abs().max().item() <= 1e-4


def test_gpt2_conv1d_layers_round_trip_with_peft(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                     n_positions=128, bos_token_id=None, eos_token_id=None)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path / "base")
    ours = load_hf_checkpoint(tmp_path / "base")
    add_lora(ours, LoraConfig(r=4, target_modules=("o_proj", "up_proj", "down_proj")))
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert saved["target_modules"] == ["c_fc", "c_proj"] and saved["fan_in_fan_out"] is True
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    adapter = load_adapter(tmp_path / "adapter")
    assert adapter.family == "gpt2"
    x = ids(2, 10)
    with torch.no_grad():
        assert (ours(x) - peft_model(x).logits).abs().max().item() <= 1e-4
    add_lora(ours, LoraConfig(r=2, target_modules=("q_proj",)), name="fused")
    with pytest.raises(WeightsError, match="fuses q/k/v into c_attn"):
        save_adapter(ours, tmp_path / "fused", name="fused")
