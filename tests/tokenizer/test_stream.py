"""StreamDecoder: chunks concatenate to decode(all ids), never split a character, small window."""

import pytest
from tokenizers import SentencePieceBPETokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from pagoda.tokenizer import StreamDecoder, Tokenizer

TEXTS = [
    "Hello world, streaming text token by token.",
    "你好世界！这是一个流式解码的测试。",
    "emoji 🎉🎉 and family 👨\u200d👩\u200d👧 and flags 🇯🇵",
    "mixed 中文 and English, ñandú, Привет 🙂\n\n  indented line",
]


class WindowSpy(Tokenizer):
    """Records how many ids each decode call gets."""

    lengths: list[int]

    def decode(self, ids, skip_special_tokens=False):
        self.lengths.append(len(ids))
        return super().decode(ids, skip_special_tokens)


def byte_level_tokenizer(cls: type[Tokenizer] = Tokenizer) -> Tokenizer:
    """Small byte-level BPE: most CJK characters and emoji span several tokens."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TEXTS * 3, trainer)
    return cls(backend, eos_token="<|im_end|>")


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    decoder = StreamDecoder(tok, skip_special_tokens=skip_special_tokens)
    chunks = [decoder.push(i) for i in ids]
    return [*chunks, decoder.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_stream_equals_full_decode(text):
    tok = byte_level_tokenizer()
    ids = tok.encode(text)
    assert len(ids) > len(text.encode()) // 4  # multi-byte characters really are split
    chunks = stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == text
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_partial_character_is_held_back():
    tok = byte_level_tokenizer()
    ids = tok.encode("🎉")
    assert len(ids) > 1
    decoder = StreamDecoder(tok)
    assert [decoder.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.push(ids[-1]) == "🎉"
    truncated = StreamDecoder(tok)
    for i in ids[:-1]:
        truncated.push(i)
    assert truncated.flush() == tok.decode(ids[:-1])  # the broken tail is only shown at the end


def test_special_tokens_skipped_or_kept():
    tok = byte_level_tokenizer()
    ids = [*tok.encode("你好"), tok.eos_id, *tok.encode(" world")]
    assert "".join(stream(tok, ids)) == "你好 world"
    assert "".join(stream(tok, ids, skip_special_tokens=False)) == "你好<|im_end|> world"


def test_sentencepiece_spaces_survive_streaming():
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(["hello world foo bar"] * 5, vocab_size=60, show_progress=False)
    tok = Tokenizer(Backend.from_str(sp.to_str()))
    ids = tok.encode("hello  world foo bar")
    assert "".join(stream(tok, ids)) == tok.decode(ids) == "hello  world foo bar"


def test_decodes_a_small_window_only():
    tok = byte_level_tokenizer(WindowSpy)
    ids = tok.encode(" ".join(TEXTS) * 20)
    tok.lengths = []
    assert "".join(stream(tok, ids)) == tok.backend.decode(ids)
    assert len(ids) > 1000 and max(tok.lengths) <= 12
