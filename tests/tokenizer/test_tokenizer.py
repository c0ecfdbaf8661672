"""Tokenizer: GGUF vocab parity with transformers, HF folder round trip, and file errors."""

import json

import gguf
import pytest
from tokenizers import SentencePieceBPETokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from pagoda.errors import WeightsError
from pagoda.model.gguf_io import read_gguf_metadata
from pagoda.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "hello, World! How are you?",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "\n\nnewlines\nin\n\nthe middle\n",
    "tab\tseparated\tvalues",
    "def square(x):\n    return x ** 2  # squares\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "12345",
    "pi is 3.14159 and e is 2.71828; 1,000,000 people",
    "phone: +1 (555) 123-4567",
    "你好世界",
    "中文和English混合 text",
    "emoji 🎉🎉 party 👩\u200d💻",
    "café naïve résumé Ümlaut",
    "Привет, мир",
    "can't won't I'm they're we've",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<repo_name>pagoda<file_sep>main.py",
    "a" * 40,
    "MiXeD CaSe WORDS",
    "URL: https://example.com/path?q=1&r=2",
    "",
    " ",
    "\u00a0non-breaking",
    'JSON {"key": [1, 2, 3], "nested": {"a": null}}',
]


@pytest.fixture(scope="module")
def smol_meta(smol_gguf) -> dict:
    return read_gguf_metadata(smol_gguf)


@pytest.fixture(scope="module")
def smol(smol_meta: dict) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smol_meta)


@pytest.fixture(scope="module")
def auto_tokenizer():
    return pytest.importorskip("transformers").AutoTokenizer.from_pretrained


@pytest.mark.real_model
def test_gguf_tokenizer_encodes_and_decodes_like_transformers(smol, auto_tokenizer, smol_gguf):
    reference = auto_tokenizer(smol_gguf.parent, gguf_file=smol_gguf.name)
    for text in TEXTS:
        ids = smol.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert smol.encode(text, add_special_tokens=True) == reference.encode(text), text
        for skip in (False, True):
            assert smol.decode(ids, skip) == reference.decode(ids, skip_special_tokens=skip), text
        assert smol.decode(ids) == text


@pytest.mark.real_model
def test_gguf_special_tokens(smol):
    assert smol.vocab_size == 49152
    assert (smol.bos_id, smol.eos_id, smol.pad_id) == (1, 2, 2)
    assert smol.eos_ids == {smol.token_to_id("<|im_end|>"), smol.token_to_id("<|endoftext|>")}
    assert smol.add_bos_token is False
    assert smol.encode("<|im_start|>") == [1]  # control tokens stay whole
    assert {0, 1, 2} <= smol.special_ids
    ids = smol.encode("<|im_start|>assistant\nHi<|im_end|>")
    assert smol.decode(ids, skip_special_tokens=True) == "assistant\nHi"
    assert smol.id_to_token(smol.token_to_id("Ġhello")) == "Ġhello"
    assert smol.chat_template.startswith("{% for message in messages %}")
    assert smol.encode_batch(["Hello world", "你好"]) == [
        smol.encode("Hello world"),
        smol.encode("你好"),
    ]


@pytest.mark.real_model
def test_gguf_add_bos_token_prepends_bos(smol_meta):
    tok = Tokenizer.from_gguf_metadata({**smol_meta, "tokenizer.ggml.add_bos_token": True})
    assert tok.add_bos_token
    assert tok.encode("Hi there", add_special_tokens=True) == [1, *tok.encode("Hi there")]


@pytest.mark.real_model
@pytest.mark.parametrize("add_bos", [False, True])
def test_saved_folder_loads_in_transformers_and_pagoda(
    smol_meta, auto_tokenizer, tmp_path, add_bos
):
    tok = Tokenizer.from_gguf_metadata({**smol_meta, "tokenizer.ggml.add_bos_token": add_bos})
    tok.save(tmp_path)
    reference = auto_tokenizer(tmp_path)
    reloaded = Tokenizer.from_file(tmp_path)
    for text in TEXTS:
        for special in (False, True):
            expected = tok.encode(text, add_special_tokens=special)
            assert reference.encode(text, add_special_tokens=special) == expected, text
            assert reloaded.encode(text, add_special_tokens=special) == expected, text
    assert reference.chat_template == tok.chat_template == reloaded.chat_template
    assert (reference.bos_token, reference.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (reloaded.bos_id, reloaded.eos_id, reloaded.eos_ids) == (
        tok.bos_id,
        tok.eos_id,
        tok.eos_ids,
    )
    assert Tokenizer.from_file(tmp_path / "tokenizer.json").encode("hi 123") == tok.encode("hi 123")


@pytest.mark.real_model
def test_wordpiece_folder_encodes_and_truncates_like_transformers(minilm, auto_tokenizer):
    """all-MiniLM's BERT WordPiece: lower-casing, [CLS] ... [SEP], truncation keeping both."""
    tok, reference = minilm.tokenizer, auto_tokenizer(minilm.path)
    long = " ".join(TEXTS)
    for text in [*TEXTS, long]:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False), text
        assert tok.encode(text, add_special_tokens=True) == reference.encode(text), text
    for max_length in (3, 8, 256):
        expected = reference(TEXTS + [long], truncation=True, max_length=max_length)["input_ids"]
        got = tok.encode_batch(TEXTS + [long], add_special_tokens=True, max_length=max_length)
        assert got == expected, max_length
    assert tok.encode_batch([long], max_length=5) == [tok.encode(long)[:5]]
    with pytest.raises(ValueError, match="no room"):
        tok.encode_batch(["hi"], add_special_tokens=True, max_length=2)


def test_sentencepiece_gguf_matches_transformers(tmp_path, auto_tokenizer):
    # A Llama-2 style vocab: '▁' for spaces, <0xNN> byte fallback, no merges (derived from scores).
    trainer_input = ["hello world", "the quick brown fox jumps over the lazy dog", "Hello, World!"]
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(trainer_input * 10, vocab_size=100, show_progress=False)
    learned = [t for t, _ in sorted(sp.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *learned]
    writer = gguf.GGUFWriter(tmp_path / "sp.gguf", "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(learned))])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(learned))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()

    tok = Tokenizer.from_gguf_metadata(read_gguf_metadata(tmp_path / "sp.gguf"))
    reference = auto_tokenizer(tmp_path, gguf_file="sp.gguf")
    assert tok.add_bos_token and tok.bos_id == 1
    for text in ["hello world", " leading", "Hello,  World!\n123", "你好 🎉", "</s> the lazy fox"]:
        ids = tok.encode(text, add_special_tokens=True)
        assert ids == reference.encode(text), text
        for skip in (False, True):
            assert tok.decode(ids, skip) == reference.decode(ids, skip_special_tokens=skip), text


def _tiny_backend() -> Backend:
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(["hello world, the tiny tokenizer"] * 5, trainer)
    return backend


def test_from_file_reads_folder_configs(tmp_path):
    _tiny_backend().save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": {"content": "<s>", "special": True},
        "eos_token": "</s>",
        "add_bos_token": True,
        "chat_template": [
            {"name": "default", "template": "T"},
            {"name": "tool_use", "template": "U"},
        ],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    tok = Tokenizer.from_file(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.eos_ids == {1, 2}  # </s>, <|im_end|>
    assert tok.chat_template == "T"
    assert tok.encode("hello", add_special_tokens=True) == [0, *tok.encode("hello")]
    (tmp_path / "chat_template.jinja").write_text("J")
    assert Tokenizer.from_file(tmp_path).chat_template == "J"


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(WeightsError, match="tokenizer.json"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(WeightsError, match="tokenizer.json") as error:
        Tokenizer.from_file(tmp_path)
    assert "\n" not in str(error.value)
    _tiny_backend().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(WeightsError, match="tokenizer_config.json"):
        Tokenizer.from_file(tmp_path)


def test_gguf_metadata_errors():
    with pytest.raises(WeightsError, match="no tokenizer"):
        Tokenizer.from_gguf_metadata({"general.architecture": "llama"})
    with pytest.raises(WeightsError, match="'bert'"):
        Tokenizer.from_gguf_metadata(
            {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}
        )
