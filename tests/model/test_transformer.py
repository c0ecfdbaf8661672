"""The Transformer: shapes, tied weights, dropout, meta construction, and that it can learn."""

import math

import pytest
import torch

from pagoda.errors import ConfigError
from pagoda.model.config import ModelConfig
from pagoda.model.ffn import MixtureOfExperts
from pagoda.model.transformer import Transformer

TINY = dict(vocab_size=64, max_seq_len=32, d_model=32, n_layer=2, n_head=4, d_ff=48)


def tiny(name: str = "tiny-llama", **kw) -> ModelConfig:
    return ModelConfig.from_name(name, **{**TINY, **kw})


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-moe", "gpt2", "transformer-base",
                                  "baby-gpt", "qwen2-0.5b", "mistral-7b"])
def test_forward_shapes(name):
    cfg = tiny(name, n_kv_head=None if name in ("gpt2", "transformer-base", "baby-gpt") else 2)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 64, (3, 11))
    logits = model(ids)
    assert logits.shape == (3, 11, 64) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    last = model(ids, last_only=True)
    assert last.shape == (3, 1, 64)
    torch.testing.assert_close(last[:, 0], logits[:, -1], rtol=1e-5, atol=1e-5)


def test_keep_selects_logits_by_index_or_mask():
    model = Transformer(tiny()).eval()
    ids = torch.randint(0, 64, (2, 9))
    logits = model(ids)
    index = torch.tensor([0, 4, 8])
    torch.testing.assert_close(model(ids, keep=index), logits[:, index])
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 3], mask[1, 1], mask[1, 7] = True, True, True
    picked = model(ids, keep=mask)
    assert picked.shape == (1, 3, 64)
    torch.testing.assert_close(picked[0], torch.stack([logits[0, 3], logits[1, 1], logits[1, 7]]))


def test_tied_embeddings_share_storage():
    model = Transformer(tiny(tie_embeddings=True))
    assert model.lm_head.weight is model.embed.weight
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # counted once
    model = model.to(torch.bfloat16)
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    untied = Transformer(tiny(tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()
    assert (sum(p.numel() for p in untied.parameters())
            - sum(p.numel() for p in Transformer(tiny()).parameters())) == 64 * 32


def test_training_a_tied_model_updates_one_matrix():
    model = Transformer(tiny(tie_embeddings=True))
    ids = torch.randint(0, 64, (2, 8))
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert model.lm_head.weight is model.embed.weight


def test_dropout_only_in_train_mode():
    model = Transformer(tiny("baby-gpt", dropout=0.3))
    ids = torch.randint(0, 64, (2, 10))
    model.eval()
    torch.testing.assert_close(model(ids), model(ids))
    model.train()
    torch.manual_seed(0)
    a = model(ids)
    torch.manual_seed(1)
    b = model(ids)
    assert (a - b).abs().max() > 1e-3
    torch.manual_seed(0)
    torch.testing.assert_close(model(ids), a)  # same seed, same mask
    no_dropout = Transformer(tiny("baby-gpt", dropout=0.0)).train()
    torch.testing.assert_close(no_dropout(ids), no_dropout(ids))


def test_on_meta_allocates_nothing():
    model = Transformer.on_meta(ModelConfig.from_name("gpt3-175b"))
    params = list(model.parameters())
    assert params and all(p.is_meta for p in params)
    assert all(b.is_meta for b in model.buffers())
    assert sum(p.numel() for p in params) == 174_604_259_328
    assert model.lm_head.weight is model.embed.weight


def test_on_meta_rope_model_has_meta_tables():
    model = Transformer.on_meta(ModelConfig.from_name("llama3-8b"))
    assert model.rope_cos.is_meta and model.rope_cos.shape == (8192, 128)


def test_init_follows_gpt2():
    torch.manual_seed(0)
    cfg = tiny("gpt2", d_model=256, d_ff=1024, vocab_size=512, n_layer=4)
    model = Transformer(cfg)
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    block = model.layers[0]
    assert block.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.attn.o_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert block.ffn.down_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert block.attn.q_proj.bias.eq(0).all() and block.attn_norm.bias.eq(0).all()
    assert block.attn_norm.weight.eq(1).all() and model.final_norm.weight.eq(1).all()


def test_scale_embeddings_multiplies_by_sqrt_d_model():
    cfg = tiny("tiny-llama", pos_encoding="none", n_layer=1)
    plain = Transformer(cfg).eval()
    scaled = Transformer(cfg.replace(scale_embeddings=True)).eval()
    scaled.load_state_dict(plain.state_dict())
    seen = {}
    for name, model in (("plain", plain), ("scaled", scaled)):
        model.layers[0].attn_norm.register_forward_pre_hook(
            lambda m, args, name=name: seen.setdefault(name, args[0]))
        model(torch.tensor([[1, 2, 3]]))
    torch.testing.assert_close(seen["scaled"], seen["plain"] * math.sqrt(32))


def test_explicit_positions_shift_learned_positions():
    model = Transformer(tiny("gpt2")).eval()
    ids = torch.randint(0, 64, (1, 5))
    default = model(ids)
    same = model(ids, positions=torch.arange(5)[None])
    torch.testing.assert_close(default, same)
    assert (model(ids, positions=torch.arange(3, 8)[None]) - default).abs().max() > 1e-4


def test_bidirectional_encoder_sees_the_future():
    model = Transformer(tiny(causal=False)).eval()
    ids = torch.randint(0, 64, (1, 6))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 64
    assert (model(ids)[0, 0] - model(changed)[0, 0]).abs().max() > 1e-5
    causal = Transformer(tiny()).eval()
    torch.testing.assert_close(causal(ids)[0, :5], causal(changed)[0, :5])


def test_aux_loss_is_zero_for_dense_and_positive_for_moe():
    dense = Transformer(tiny())
    dense(torch.randint(0, 64, (1, 4)))
    assert dense.aux_loss.item() == 0.0
    moe = Transformer(tiny("tiny-moe"))
    ids = torch.randint(0, 64, (2, 8))
    moe(ids)
    assert moe.aux_loss.item() >= 2.0 - 1e-4  # one Switch loss >= 1 per MoE layer
    ce = torch.nn.functional.cross_entropy(moe(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    layers = [m.aux_loss for m in moe.modules() if isinstance(m, MixtureOfExperts)]
    expected = ce + moe.cfg.moe_aux_loss_coef * sum(layers)
    torch.testing.assert_close(moe.loss(ids[:, :-1], ids[:, 1:]), expected)


def test_loss_ignores_masked_targets():
    model = Transformer(tiny()).eval()
    ids = torch.randint(0, 64, (1, 6))
    targets = ids.clone()
    targets[0, :3] = -100
    logits = model(ids)
    expected = torch.nn.functional.cross_entropy(logits[0, 3:], targets[0, 3:])
    torch.testing.assert_close(model.loss(ids, targets), expected)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-moe", "transformer-base"])
def test_learning_works(name):
    """A few AdamW steps on one repeated sequence drive the loss well down."""
    torch.manual_seed(0)
    model = Transformer(tiny(name, dropout=0.0)).train()
    seq = torch.randint(0, 64, (1, 17)).repeat(4, 1)
    idx, targets = seq[:, :-1], seq[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model.loss(idx, targets).item()
    assert first == pytest.approx(math.log(64), rel=0.2)  # near uniform at init
    for _ in range(30):
        loss = model.loss(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_bf16_forward():
    model = Transformer(tiny()).to(torch.bfloat16).eval()
    logits = model(torch.randint(0, 64, (2, 5)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"


# --- the encoder configuration (BERT) -----------------------------------------------------------
def right_padded(seqs: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) right-padded with `pad`, and the (B, T) bool mask of real tokens."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad)
    real = torch.zeros(len(seqs), T, dtype=torch.bool)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)], real[row, :len(seq)] = seq, True
    return ids, real


def test_encoder_returns_hidden_states_and_has_no_head():
    cfg = tiny("minilm-l6")
    model = Transformer(cfg).eval()
    assert model.lm_head is None and model.final_norm is None
    assert model.type_embed.weight.shape == (2, 32) and model.embed_norm is not None
    hidden = model(torch.randint(0, 64, (3, 7)))
    assert hidden.shape == (3, 7, 32) and torch.isfinite(hidden).all()
    with pytest.raises(ConfigError, match="no lm head"):
        model.loss(torch.randint(0, 64, (1, 4)), torch.randint(0, 64, (1, 4)))
    with pytest.raises(ConfigError, match="tie_embeddings needs an lm_head"):
        cfg.replace(tie_embeddings=True)


@pytest.mark.parametrize("name", ["minilm-l6", "tiny-llama"])
def test_padding_mask_makes_each_row_equal_its_sequence_alone(name):
    """Real tokens never attend to padding, bidirectional or causal."""
    torch.manual_seed(0)
    model = Transformer(tiny(name, init_std=0.3)).eval()
    seqs = [torch.randint(1, 64, (n,)) for n in (9, 4, 1, 6)]
    ids, real = right_padded(seqs)
    batched = model(ids, attention_mask=real)
    for row, seq in enumerate(seqs):
        alone = model(seq[None])[0]
        torch.testing.assert_close(batched[row, :len(seq)], alone, rtol=1e-5, atol=1e-5)
    if not model.cfg.causal:  # without the mask, padding would leak into the shorter rows
        assert (model(ids)[1, :4] - batched[1, :4]).abs().max() > 1e-3


def test_all_real_mask_changes_nothing():
    model = Transformer(tiny("minilm-l6")).eval()
    ids = torch.randint(0, 64, (2, 5))
    torch.testing.assert_close(model(ids, attention_mask=torch.ones(2, 5, dtype=torch.bool)),
                               model(ids))


def test_token_types_default_to_sentence_a():
    torch.manual_seed(0)
    model = Transformer(tiny("minilm-l6", init_std=0.3)).eval()
    ids = torch.randint(0, 64, (2, 5))
    torch.testing.assert_close(model(ids, token_types=torch.zeros_like(ids)), model(ids))
    assert (model(ids, token_types=torch.ones_like(ids)) - model(ids)).abs().max() > 1e-3


def test_embedding_norm_normalises_the_summed_embeddings():
    model = Transformer(tiny("minilm-l6")).eval()
    seen = {}
    model.layers[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    model(torch.randint(0, 64, (1, 6)))
    x = seen["x"]  # LayerNorm at init (weight 1, bias 0): zero mean, unit variance per token
    torch.testing.assert_close(x.mean(-1), torch.zeros(1, 6), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.var(-1, unbiased=False), torch.ones(1, 6), atol=1e-4, rtol=0)


def test_attention_mask_is_refused_with_a_cache():
    from pagoda.model.kv_cache import KVCache

    cfg = tiny()
    model = Transformer(cfg).eval()
    cache = KVCache(cfg, batch_size=1, max_len=8)
    with pytest.raises(ValueError, match="uncached"):
        model(torch.randint(0, 64, (1, 3)), cache=cache,
              attention_mask=torch.ones(1, 3, dtype=torch.bool))


@pytest.mark.parametrize("name", ["tiny-llama", "baby-gpt"])
def test_packed_segments_equal_each_sequence_alone(name):
    """Two sequences packed in one row (positions restarting, padding after) keep their logits."""
    torch.manual_seed(0)
    model = Transformer(tiny(name, init_std=0.3)).eval()
    first, second = torch.randint(1, 64, (7,)), torch.randint(1, 64, (5,))
    ids = torch.cat([first, second, torch.zeros(3, dtype=torch.long)])[None]  # (1, 15)
    segments = torch.tensor([[1] * 7 + [2] * 5 + [0] * 3])
    positions = torch.tensor([list(range(7)) + list(range(5)) + [0, 1, 2]])
    packed = model(ids, positions=positions, segments=segments)[0]
    torch.testing.assert_close(packed[:7], model(first[None])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[7:12], model(second[None])[0], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(packed).all()  # padding sees itself, so no all-masked softmax row
    # Without segments the second sequence would attend to the first.
    leaky = model(ids, positions=positions)[0]
    assert (leaky[7:12] - packed[7:12]).abs().max() > 1e-3


def test_one_segment_equals_plain_causal():
    model = Transformer(tiny()).eval()
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(model(ids, segments=torch.ones_like(ids)), model(ids),
                               rtol=1e-5, atol=1e-5)


def test_segments_are_refused_with_a_cache():
    from pagoda.model.kv_cache import KVCache

    cfg = tiny()
    model = Transformer(cfg).eval()
    cache = KVCache(cfg, batch_size=1, max_len=8)
    with pytest.raises(ValueError, match="uncached"):
        model(torch.randint(0, 64, (1, 3)), cache=cache, segments=torch.ones(1, 3, dtype=torch.long))
