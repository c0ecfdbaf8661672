"""Prompt tuning and P-Tuning v2 on a tiny random Llama: equivalence with prepending, packing,
training only the virtual tokens, cached decoding, files, and parity with PEFT."""

from __future__ import annotations

import json

import pytest
import torch

from pagoda.errors import ContextLengthError, WeightsError
from pagoda.model.config import ModelConfig
from pagoda.model.transformer import Transformer
from pagoda.train.prompt_tuning import (
    PrefixTuning,
    PromptTunedModel,
    SoftPrompt,
    VirtualTokens,
    build_virtual_tokens,
    count_parameters,
    generate_ids,
    is_virtual_tokens_folder,
    load_virtual_tokens,
    save_virtual_tokens,
)
from pagoda.train.sft_data import IGNORE, SftExample, sft_batches, sft_loss

P = 4  # virtual tokens


def tiny(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name("tiny-llama", vocab_size=64, max_seq_len=64, init_std=0.2,
                                **overrides)
    return Transformer(cfg).eval()


def perturbed(tokens: VirtualTokens, seed: int = 1) -> VirtualTokens:
    """Move the parameters off their init so a test cannot pass by symmetry."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tokens.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return tokens


def make(model: Transformer, method: str, projection_dim: int = 0) -> VirtualTokens:
    return perturbed(build_virtual_tokens(model, method, P, projection_dim=projection_dim))


METHODS = [("prompt", 0), ("ptuning", 0), ("ptuning", 16)]


def test_inputs_embeds_equal_token_ids():
    model = tiny()
    ids = torch.randint(64, (2, 9))
    torch.testing.assert_close(model(None, inputs_embeds=model.embed(ids)), model(ids))


def test_soft_prompt_equals_prepending_the_embeddings():
    """The cached prefix of a soft prompt is exactly the prepended-embeddings forward."""
    model = tiny()
    tokens = make(model, "prompt")
    ids = torch.randint(64, (3, 7))
    prepended = torch.cat([tokens.weight[None].expand(3, -1, -1), model.embed(ids)], dim=1)
    expected = model(None, inputs_embeds=prepended)[:, P:]
    torch.testing.assert_close(tokens.logits(model, ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method, projection_dim", METHODS)
def test_packed_rows_equal_examples_alone(method, projection_dim):
    model = tiny()
    tokens = make(model, method, projection_dim)
    a, b = torch.randint(64, (1, 5)), torch.randint(64, (1, 3))
    packed = torch.cat([a, b, torch.zeros(1, 2, dtype=torch.long)], dim=1)  # + 2 padding
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 0]])
    segments = torch.tensor([[1, 1, 1, 1, 1, 2, 2, 2, 0, 0]])
    logits = tokens.logits(model, packed, positions, segments)
    torch.testing.assert_close(logits[:, :5], tokens.logits(model, a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[:, 5:8], tokens.logits(model, b), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(logits).all()


def test_the_prefix_changes_the_output():
    model = tiny()
    ids = torch.randint(64, (1, 6))
    one, two = make(model, "ptuning"), perturbed(make(model, "ptuning"), seed=7)
    assert not torch.allclose(one.logits(model, ids), two.logits(model, ids))


@pytest.mark.parametrize("method, projection_dim", METHODS)
def test_training_moves_only_the_virtual_tokens_and_lowers_the_loss(method, projection_dim):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = build_virtual_tokens(model, method, P, projection_dim=projection_dim, seed=3)
    tuned = PromptTunedModel(model, tokens).train()
    generator = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(4):  # a fixed answer after random prompts: learnable by a prefix
        prompt = torch.randint(3, 64, (5,), generator=generator).tolist()
        answer = [1, 2, 1, 2, 1]
        examples.append(SftExample(prompt + answer, [IGNORE] * 5 + answer))
    batch = sft_batches(examples, seq_len=40, batch_size=4, pack=True)[0]
    assert int(batch.segments.max()) > 1  # several examples packed in one row
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(12):
        loss = sft_loss(tuned, batch)
        optimizer.zero_grad()
        loss.backward()
        if not losses:  # the first step: gradients reach the virtual tokens and nothing else
            assert all(p.grad is None for p in model.parameters())
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tokens.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def reference_greedy(model: Transformer, tokens: VirtualTokens | None, prompt: list[int],
                     n: int) -> list[int]:
    """Recompute the whole sequence at every step, no KV cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([ids])
            logits = tokens.logits(model, x) if tokens is not None else model(x)
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("method, projection_dim", [*METHODS, (None, 0)])
def test_cached_decoding_equals_recomputing(method, projection_dim):
    model = tiny()
    tokens = make(model, method, projection_dim) if method else None
    prompts = [[5, 9, 13, 2, 7], [11, 3], [8, 8, 20, 31]]  # different lengths: left padding
    got = generate_ids(model, tokens, prompts, max_new_tokens=8)
    assert got == [reference_greedy(model, tokens, p, 8) for p in prompts]


def test_decoding_stops_at_eos_and_checks_the_context():
    model = tiny()
    tokens = make(model, "prompt")
    full = generate_ids(model, tokens, [[5, 9, 13]], max_new_tokens=6)[0]
    stopped = generate_ids(model, tokens, [[5, 9, 13]], max_new_tokens=6, eos_ids={full[2]})[0]
    assert stopped == full[:full.index(full[2])]
    with pytest.raises(ContextLengthError, match="exceed the model's context of 64"):
        generate_ids(model, tokens, [[1] * 50], max_new_tokens=20)


def test_sampling_is_seeded():
    model = tiny()
    tokens = make(model, "ptuning")
    runs = [generate_ids(model, tokens, [[4, 5, 6]], 10, temperature=1.5, seed=s)
            for s in (1, 1, 2)]
    assert runs[0] == runs[1] and len(runs[0][0]) == 10
    assert runs[0] != runs[2]


def test_init_from_text_and_from_real_activations():
    model = tiny()

    class Tok:  # the two methods build_virtual_tokens calls on a tokenizer
        def encode(self, text: str) -> list[int]:
            return [ord(c) % 64 for c in text]

    soft = build_virtual_tokens(model, "prompt", 5, tokenizer=Tok(), init_text="ab")
    ids = [ord(c) % 64 for c in "ababa"]
    torch.testing.assert_close(soft.weight, model.embed.weight[ids])
    # a prefix initialised from real tokens reproduces what the model computes for them
    prefix = build_virtual_tokens(model, "ptuning", 5, tokenizer=Tok(), init_text="ab")
    text = torch.tensor([[3, 4, 5]])
    expected = model(torch.cat([torch.tensor([ids]), text], dim=1))[:, 5:]
    torch.testing.assert_close(prefix.logits(model, text), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method, projection_dim", METHODS)
def test_save_and_load_round_trip(tmp_path, method, projection_dim):
    model = tiny()
    tokens = make(model, method, projection_dim)
    folder = save_virtual_tokens(tokens, model, tmp_path / "adapter", base_model="tiny")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == ("PROMPT_TUNING" if method == "prompt" else "PREFIX_TUNING")
    assert config["base_model_name_or_path"] == "tiny"
    assert is_virtual_tokens_folder(folder) and not list(folder.glob("*.tmp"))
    loaded = load_virtual_tokens(folder, model.cfg)
    assert type(loaded) is type(tokens) and loaded.num_virtual_tokens == P
    ids = torch.randint(64, (2, 6))
    torch.testing.assert_close(loaded.logits(model, ids), tokens.logits(model, ids))
    if projection_dim:  # saved in inference form: the MLP's output, no MLP
        assert loaded.mlp is None and count_parameters(loaded)[0] < count_parameters(tokens)[0]


def test_load_rejects_other_models_and_broken_files(tmp_path):
    model = tiny()
    folder = save_virtual_tokens(make(model, "ptuning"), model, tmp_path / "a")
    with pytest.raises(WeightsError, match="2-layer model, this one has 3"):
        load_virtual_tokens(folder, tiny(n_layer=3).cfg)
    with pytest.raises(WeightsError, match="does not fit this model"):
        load_virtual_tokens(folder, tiny(n_kv_head=4).cfg)
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_virtual_tokens(folder, model.cfg)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert not is_virtual_tokens_folder(folder)
    with pytest.raises(WeightsError, match="'LORA' is not prompt or prefix tuning"):
        load_virtual_tokens(folder, model.cfg)
    with pytest.raises(WeightsError, match="no such file"):
        load_virtual_tokens(tmp_path / "missing", model.cfg)


def test_parameter_counts():
    model = tiny()
    cfg = model.cfg
    assert count_parameters(SoftPrompt(cfg, P))[0] == P * cfg.d_model
    width = cfg.n_layer * 2 * cfg.kv_heads * cfg.dim_head
    assert count_parameters(PrefixTuning(cfg, P))[0] == P * width
    mlp = PrefixTuning(cfg, P, projection_dim=8)
    assert count_parameters(mlp)[0] == P * cfg.d_model + cfg.d_model * 8 + 8 + 8 * width + width
    tuned = PromptTunedModel(model, SoftPrompt(cfg, P))
    trainable, total = count_parameters(tuned)
    assert trainable == P * cfg.d_model
    assert total == trainable + sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_peft_loads_the_saved_folder_and_agrees(tmp_path, method):
    """What Pagoda saves, PEFT + transformers load and compute the same logits with."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from pagoda.model.hf_checkpoint import save_hf_checkpoint

    model = tiny()
    tokens = make(model, method)
    save_hf_checkpoint(model, tmp_path / "base")
    save_virtual_tokens(tokens, model, tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base",
                                                             dtype=torch.float32)
    tuned = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.randint(64, (2, 7))
    with torch.no_grad():
        theirs = tuned(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    theirs = theirs[:, -7:]  # prompt tuning returns the virtual positions' logits too
    torch.testing.assert_close(tokens.logits(model, ids).detach(), theirs, atol=1e-4, rtol=1e-4)
