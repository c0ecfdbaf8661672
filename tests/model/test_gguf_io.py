"""GGUF files: tiny ones written here with `gguf.GGUFWriter`, and the real SmolLM2-135M Q4_1.

The tiny files are written the way llama.cpp's converter writes them (q/k rows permuted for its
interleaved RoPE on llama; F32, F16 or Q8_0 data), so loading must undo exactly that.
"""

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from pagoda.errors import WeightsError
from pagoda.infer.generate import generate_tokens
from pagoda.infer.sampling import SamplingParams
from pagoda.model.config import ModelConfig
from pagoda.model.gguf_io import gguf_config, load_gguf, read_gguf_metadata
from pagoda.model.transformer import Transformer

Q = gguf.GGMLQuantizationType
VOCAB = 96
TINY = dict(vocab_size=VOCAB, max_seq_len=64, d_model=64, n_layer=2, n_head=4, d_ff=96,
            bos_token_id=1, eos_token_id=2)
_OURS = {"attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "attn_q": "attn.q_proj",
         "attn_k": "attn.k_proj", "attn_v": "attn.v_proj", "attn_output": "attn.o_proj",
         "ffn_gate": "ffn.gate_proj", "ffn_up": "ffn.up_proj", "ffn_down": "ffn.down_proj"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows of llama models."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_gguf(model: Transformer, path: Path, qtype: Q = Q.F32, skip: tuple[str, ...] = (),
               arch: str | None = None) -> Path:
    """Write `model` as llama.cpp would; `skip` leaves out header keys (to test errors)."""
    cfg = model.cfg
    w = gguf.GGUFWriter(path, arch or cfg.arch)
    keys = {
        "context_length": cfg.max_seq_len, "embedding_length": cfg.d_model,
        "block_count": cfg.n_layer, "feed_forward_length": cfg.d_ff,
        "head_count": cfg.n_head, "head_count_kv": cfg.kv_heads,
        "layer_norm_rms_eps": cfg.norm_eps, "rope_freq_base": cfg.rope_theta,
    }
    for key, value in keys.items():
        if key not in skip:
            getattr(w, f"add_{key}")(value)
    w.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": state["embed.weight"],
               "output_norm.weight": state["final_norm.weight"]}
    if not cfg.tie_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    for i in range(cfg.n_layer):
        for gg, ours in _OURS.items():
            for kind in ("weight", "bias"):
                if f"layers.{i}.{ours}.{kind}" not in state:
                    continue
                t = state[f"layers.{i}.{ours}.{kind}"]
                if cfg.arch == "llama" and gg in ("attn_q", "attn_k") and kind == "weight":
                    t = llama_cpp_permute(t, cfg.n_head if gg == "attn_q" else cfg.kv_heads)
                tensors[f"blk.{i}.{gg}.{kind}"] = t
    for name, t in tensors.items():
        if t.ndim == 2 and qtype == Q.Q8_0:
            w.add_tensor(name, gguf.quants.quantize(t, Q.Q8_0), raw_dtype=Q.Q8_0)
        elif t.ndim == 2 and qtype == Q.F16:
            w.add_tensor(name, t.astype(np.float16))
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cfg", [
    ModelConfig.from_name("tiny-llama", **TINY, n_kv_head=2),
    ModelConfig.from_name("tiny-llama", **TINY, n_kv_head=1, tie_embeddings=False),
    ModelConfig.from_name("smollm2-135m", **TINY, n_kv_head=4),
    ModelConfig.from_name("qwen2-0.5b", **TINY, n_kv_head=2),
], ids=["llama-gqa-tied", "llama-mqa-untied", "llama-mha", "qwen2-bias"])
def test_f32_gguf_loads_to_the_same_model(cfg, tmp_path):
    model = random_model(cfg)
    path = write_gguf(model, tmp_path / "tiny.gguf")
    loaded, meta = load_gguf(path)
    assert loaded.cfg.arch == cfg.arch and loaded.cfg.kv_heads == cfg.kv_heads
    assert loaded.cfg.tie_embeddings == cfg.tie_embeddings
    assert loaded.cfg.attn_qkv_bias == cfg.attn_qkv_bias
    assert (loaded.cfg.bos_token_id, loaded.cfg.eos_token_id) == (1, 2)
    assert meta["tokenizer.ggml.tokens"][:2] == ["<t0>", "<t1>"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), model(IDS), rtol=0, atol=1e-6)


def test_quantized_tensors_are_dequantized(tmp_path):
    model = random_model(ModelConfig.from_name("tiny-llama", **TINY, n_kv_head=2))
    for qtype, tol in ((Q.F16, 1e-2), (Q.Q8_0, 0.2)):  # logits are of order 1
        loaded, _ = load_gguf(write_gguf(model, tmp_path / f"{qtype.name}.gguf", qtype))
        up = model.layers[1].ffn.up_proj.weight.detach().numpy()
        if qtype == Q.Q8_0:
            expected = gguf.quants.dequantize(gguf.quants.quantize(up, Q.Q8_0), Q.Q8_0)
        else:
            expected = up.astype(np.float16).astype(np.float32)
        assert np.array_equal(loaded.layers[1].ffn.up_proj.weight.detach().numpy(), expected)
        assert not np.array_equal(expected, up)
        with torch.no_grad():
            assert (loaded(IDS) - model(IDS)).abs().max().item() < tol


def test_header_alone_gives_the_config(tmp_path):
    cfg = ModelConfig.from_name("tiny-llama", **TINY, n_kv_head=2, rope_theta=50000.0,
                                norm_eps=1e-6)
    path = write_gguf(random_model(cfg), tmp_path / "tiny.gguf")
    read = gguf_config(path)
    for field in ("vocab_size", "max_seq_len", "d_model", "n_layer", "n_head", "kv_heads",
                  "dim_head", "d_ff", "rope_theta", "tie_embeddings", "bos_token_id"):
        assert getattr(read, field) == getattr(cfg, field), field
    assert read.norm_eps == pytest.approx(1e-6) and read.name == "tiny"
    meta = read_gguf_metadata(path)
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
    assert isinstance(meta["llama.rope.freq_base"], float)


def test_loads_in_bf16(tmp_path):
    path = write_gguf(random_model(ModelConfig.from_name("tiny-llama", **TINY)),
                      tmp_path / "t.gguf")
    model, _ = load_gguf(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.embed.weight


# --- bad input -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    model = random_model(ModelConfig.from_name("tiny-llama", **TINY))
    return write_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.05, 0.3, 0.9, 0.9999])
def test_truncated_gguf(tiny_gguf, tmp_path, fraction):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:max(5, int(len(data) * fraction))])
    with pytest.raises(WeightsError) as err:
        load_gguf(cut)
    assert str(cut) in str(err.value)
    assert "truncated or corrupt" in str(err.value) or "cannot read tensor" in str(err.value)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 a zip file, not a model")
    with pytest.raises(WeightsError, match="is not a GGUF file"):
        load_gguf(path)
    path.write_bytes(b"")
    with pytest.raises(WeightsError, match="is not a GGUF file"):
        gguf_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="cannot read .*missing.gguf.*No such file"):
        load_gguf(tmp_path / "missing.gguf")


def test_unsupported_architecture(tmp_path):
    model = random_model(ModelConfig.from_name("tiny-llama", **TINY))
    path = write_gguf(model, tmp_path / "t.gguf", arch="falcon")
    with pytest.raises(WeightsError, match="'falcon' is not supported.*llama, qwen2"):
        load_gguf(path)


def test_missing_header_key(tmp_path):
    model = random_model(ModelConfig.from_name("tiny-llama", **TINY))
    path = write_gguf(model, tmp_path / "t.gguf", skip=("block_count",))
    with pytest.raises(WeightsError, match="lacks llama.block_count"):
        gguf_config(path)


def test_header_that_does_not_match_the_tensors(tmp_path):
    model = random_model(ModelConfig.from_name("tiny-llama", **TINY))
    path = write_gguf(model, tmp_path / "t.gguf")
    data = bytearray(path.read_bytes())
    key = b"llama.feed_forward_length"
    at = data.index(key) + len(key) + 4  # then a 4-byte value type, then the uint32 value
    assert int.from_bytes(data[at:at + 4], "little") == 96
    data[at:at + 4] = (128).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"ffn.*\(128, 64\)"):
        load_gguf(path)


# --- the real SmolLM2-135M-Instruct (Q4_1) against transformers' own GGUF loader -------------

SENTENCE = ("The Great Wall of China is a series of fortifications that were built across the "
            "historical northern borders of ancient Chinese states and Imperial China as "
            "protection against various nomadic groups from the Eurasian Steppe.")


@pytest.fixture(scope="module")
def hf_smol(smol_gguf):
    """transformers' LlamaForCausalLM, dequantized from the same GGUF file (loaded once)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smol_gguf.parent), gguf_file=smol_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.mark.real_model
def test_real_model_size_and_config(smol):
    model = smol.model
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    preset = ModelConfig.from_name("smollm2-135m")
    for field in ("vocab_size", "max_seq_len", "d_model", "n_layer", "n_head", "kv_heads",
                  "d_ff", "rope_theta", "tie_embeddings", "norm", "activation"):
        assert getattr(model.cfg, field) == getattr(preset, field), field
    assert model.cfg.extra["gguf_file_type"] == 3  # MOSTLY_Q4_1


@pytest.mark.real_model
def test_real_model_logits_match_transformers(smol, hf_smol):
    ids = torch.tensor([smol.tokenizer.encode(SENTENCE)])
    assert 30 <= ids.shape[1] <= 50
    with torch.no_grad():
        expected = hf_smol(ids).logits
        got = smol.model(ids)
    assert (got - expected).abs().max().item() <= 1e-4
    assert torch.equal(got[0].argmax(-1), expected[0].argmax(-1))


@pytest.mark.real_model
def test_real_model_greedy_tokens_match_transformers(smol, hf_smol):
    prompt = smol.tokenizer.encode("Photosynthesis is the process by which")
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    got = [e.token_id for step in generate_tokens(smol.model, [prompt], [params]) for e in step]
    ids = torch.tensor([prompt])
    expected = hf_smol.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=32, min_new_tokens=32)[0, len(prompt):].tolist()
    assert smol.model.cfg.eos_token_id not in got  # so min_new_tokens changed nothing in HF
    assert got == expected
    assert len(set(got)) > 8
