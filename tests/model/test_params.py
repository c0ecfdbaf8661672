import json

import pytest
from rich.console import Console

from pagoda.model.config import ModelConfig
from pagoda.model.params import count_parameters, human_bytes, human_count
from pagoda.model.presets import PRESETS
from pagoda.model.transformer import Transformer


def report(name: str, **overrides):
    return count_parameters(ModelConfig.from_name(name, **overrides))


def test_gpt3_counted_exactly_on_meta(monkeypatch):
    built = []
    on_meta = Transformer.on_meta

    def spy(cfg):
        built.append(on_meta(cfg))
        return built[-1]

    monkeypatch.setattr(Transformer, "on_meta", spy)
    r = report("gpt3-175b")
    assert r.total == 174_604_259_328
    assert r.classic == 173_946_175_488
    assert r.ratio == pytest.approx(174_604_259_328 / 173_946_175_488)
    assert len(built) == 1 and all(p.is_meta for p in built[0].parameters())
    assert human_count(r.total) == "174.6B"


@pytest.mark.parametrize("name, total", [("smollm2-135m", 134_515_008), ("gpt2", 124_439_808)])
def test_published_totals(name, total):
    assert report(name).total == total


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-moe", "baby-gpt", "transformer-base"])
def test_total_matches_a_real_model(name):
    cfg = ModelConfig.from_name(name)
    assert count_parameters(cfg).total == sum(p.numel() for p in Transformer(cfg).parameters())


@pytest.mark.parametrize("name", list(PRESETS))
def test_components_add_up_to_total(name):
    r = report(name)
    assert sum(r.components.values()) == r.total
    assert all(n > 0 for label, n in r.components.items() if label != "lm head")


def test_attention_and_ffn_components_are_summed_over_layers():
    c = report("gpt2").components
    L, d = 12, 768
    for m in ("Wq", "Wk", "Wv", "Wo"):
        assert c[f"attention {m}"] == L * d * d
        assert c[f"attention {m} bias"] == L * d
    assert c["FFN up"] == c["FFN down"] == L * d * 4 * d
    assert c["position embedding"] == 1024 * d
    assert c["norms"] == (2 * L + 1) * 2 * d  # LayerNorm weight and bias
    s = report("smollm2-135m").components
    assert s["attention Wk"] == 30 * (3 * 64) * 576
    assert "position embedding" not in s and "attention Wq bias" not in s


def test_encoder_has_token_types_and_no_lm_head():
    r = report("minilm-l6")
    assert r.components["token-type embedding"] == 2 * 384
    assert r.components["norms"] == (2 * 6 + 1) * 2 * 384  # two per block + the embedding norm
    assert "lm head" not in r.components and not r.tied
    assert list(r.components)[:3] == ["token embedding", "position embedding",
                                      "token-type embedding"]


def test_tied_and_untied_differ_by_vocab_times_d():
    tied, untied = report("smollm2-135m"), report("smollm2-135m", tie_embeddings=False)
    assert tied.tied and not untied.tied
    assert tied.components["lm head"] == 0
    assert untied.components["lm head"] == 49152 * 576
    assert untied.total - tied.total == 49152 * 576


def test_moe_reports_router_experts_and_active_parameters():
    r = report("tiny-moe")
    per_expert_layer = 3 * 96 * 64  # gate, up, down of one expert
    assert r.expert == 2 * 4 * per_expert_layer
    assert r.components["MoE router"] == 2 * 4 * 64
    assert r.components["experts gate"] == 2 * 4 * 96 * 64
    assert "FFN gate" not in r.components
    assert r.active == r.total - r.expert + r.expert * 2 // 4
    assert r.active < r.total
    assert report("tiny-llama").active == report("tiny-llama").total


def test_memory_arithmetic():
    r = report("smollm2-135m")
    assert r.kv_bytes_per_token() == {"fp32": 2 * 30 * 3 * 64 * 4, "bf16": 2 * 30 * 3 * 64 * 2}
    assert r.kv_bytes_per_token()["fp32"] == 46_080
    assert r.kv_bytes_context()["bf16"] == 23_040 * 8192
    assert r.weight_bytes() == {"fp32": 4 * r.total, "bf16": 2 * r.total, "int8": r.total,
                                "int4": r.total // 2}
    assert r.training_bytes == 16 * r.total


def test_human_numbers():
    assert human_count(134_515_008) == "134.5M"
    assert human_count(205_632) == "205.6K"
    assert human_count(512) == "512"
    assert human_bytes(4 * 134_515_008) == "538 MB"
    assert human_bytes(8 * 134_515_008) == "1.08 GB"
    assert human_bytes(46_080) == "46.1 kB"
    assert human_bytes(12) == "12 B"


def test_to_dict_is_json_and_render_shows_the_tables():
    r = report("tiny-moe")
    data = json.loads(json.dumps(r.to_dict()))
    assert data["total"] == r.total and data["components"] == r.components
    assert data["memory"]["kv_cache_per_token"]["fp32"] == 2 * 2 * 2 * 16 * 4
    console = Console(record=True, width=120)
    r.render(console)
    text = console.export_text()
    for expected in ("MoE router", "active per token", "12·L·d²", "KV cache per token",
                     "lm head (tied", "AdamW"):
        assert expected in text
