"""SFT data: the three record formats, file:line errors, assistant-only labels, packing, loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pagoda.errors import ConfigError, PagodaError
from pagoda.model.config import ModelConfig
from pagoda.model.transformer import Transformer
from pagoda.tokenizer import Tokenizer
from pagoda.tokenizer.train import train_tokenizer
from pagoda.train.sft_data import (
    IGNORE,
    DatasetError,
    SftExample,
    encode_conversations,
    encode_with_report,
    pack_rows,
    read_conversations,
    sft_batches,
    sft_loss,
    split_examples,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好！"},
]
GOOD = json.dumps({"messages": CHAT})


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    """A byte-level BPE (300 ids) with ChatML, trained in well under a second."""
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "corpus.txt"
    corpus.write_text("user assistant system: hello, how are you? fine. what is 2+2? 4\n" * 20)
    train_tokenizer([corpus], 300, root / "bpe", held_out_fraction=0.0)
    return Tokenizer.from_file(root / "bpe")


def write(path: Path, records: list) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, ensure_ascii=False, indent=2))
    return path


# ------------------------------------------------------------------ formats
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_each_format_is_parsed_to_the_same_messages(tmp_path, suffix):
    records = [
        {"messages": CHAT[:3]},
        {"conversations": [{"from": "system", "value": "Be brief."},
                           {"from": "human", "value": "What is 2+2?"},
                           {"from": "gpt", "value": "4"}]},
        {"instruction": "What is 2+2?", "output": "4", "system": "Be brief."},
        {"instruction": "Add", "input": "2+2", "output": "4"},
    ]
    chats = read_conversations(write(tmp_path / f"train{suffix}", records))
    assert chats[0] == chats[1] == chats[2] == CHAT[:3]
    assert chats[3] == [{"role": "user", "content": "Add\n\n2+2"},
                        {"role": "assistant", "content": "4"}]


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("\n" + json.dumps({"messages": CHAT}) + "\n\n")
    assert read_conversations(path) == [CHAT]


BAD_RECORDS = [
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]},
     "ShareGPT message 2 has role 'bot'; expected human, gpt, system"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]},
     "OpenAI message 2 has role 'robot'"),
    ({"messages": []}, "empty conversation"),
    ({"conversations": []}, "empty conversation"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "the conversation has no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]},
     "OpenAI message 2 content must be a string, not int"),
    ({"conversations": [{"from": "gpt", "value": None}]}, "ShareGPT message 1 value must be"),
    ({"instruction": "hi", "output": ["x"]}, "Alpaca 'output' must be a string, not list"),
    ({"instruction": " ", "output": "x"}, "Alpaca 'instruction' is empty"),
    ({"prompt": "hi", "completion": "x"}, r"unknown record format \(keys: completion, prompt\)"),
    (["not", "an", "object"], "a record must be a JSON object, not list"),
    ({"messages": "hi"}, "OpenAI 'messages' must be a list of messages, not str"),
]


@pytest.mark.parametrize(("record", "message"), BAD_RECORDS)
def test_bad_record_names_file_and_line(tmp_path, record, message):
    good = {"messages": CHAT}
    path = write(tmp_path / "train.jsonl", [good, good, record, good])
    with pytest.raises(DatasetError, match=rf"train\.jsonl:3: {message}"):
        read_conversations(path)


def test_bad_record_in_json_list_names_its_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(f'[\n  {GOOD},\n\n  {{"instruction": "x"}}\n]')
    with pytest.raises(DatasetError, match=r"train\.json:4: unknown record format"):
        read_conversations(path)


def test_invalid_jsonl(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(f'{GOOD}\n{{"messages": [}}\n')
    with pytest.raises(DatasetError, match=r"a\.jsonl:2: invalid JSON \(Expecting value at column"):
        read_conversations(path)


@pytest.mark.parametrize(("text", "message"), [
    (f'[\n{GOOD},\n{{"messages": [}}\n]', r"a\.json:3: invalid JSON \(Expecting value\)"),
    (f'[\n{GOOD}\n{GOOD}]', r"a\.json:3: invalid JSON \(expected ',' or ']'"),
    (f'[\n{GOOD},\n', r"a\.json:3: invalid JSON"),
    (f'[\n{GOOD},\n]', r"a\.json:3: invalid JSON"),
    (f'[{GOOD}] x', r"a\.json:1: invalid JSON \(text after the closing"),
    (GOOD, r"a\.json:1: a \.json file must hold one list"),
])
def test_invalid_json(tmp_path, text, message):
    path = tmp_path / "a.json"
    path.write_text(text)
    with pytest.raises(DatasetError, match=message):
        read_conversations(path)


@pytest.mark.parametrize(("name", "text"), [("empty.jsonl", ""), ("empty.jsonl", "\n \n"),
                                          ("empty.json", ""), ("empty.json", "\n"),
                                          ("empty.json", " [ ]\n")])
def test_empty_file_is_refused(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DatasetError, match=rf"{name}: the file holds no records"):
        read_conversations(path)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        read_conversations(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match="unsupported file type '.csv'"):
        read_conversations(tmp_path / "data.csv")


def test_dataset_error_is_a_pagoda_error():
    assert issubclass(DatasetError, PagodaError)


# ------------------------------------------------------------------ encoding
def test_labels_are_assistant_tokens_only(tok):
    [example] = encode_conversations(tok, [CHAT], max_len=512)
    assert len(example.ids) == len(example.labels)
    runs, current = [], []
    for token, label in zip(example.ids, example.labels, strict=True):
        if label == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    assert [tok.decode(r) for r in runs] == ["4<|im_end|>", "你好！<|im_end|>"]
    assert "What is" not in tok.decode([i for i, lab in zip(example.ids, example.labels,
                                                            strict=True) if lab != IGNORE])


def test_long_examples_are_truncated_and_untrainable_ones_skipped(tok):
    long_prompt = [{"role": "user", "content": "hello " * 200}, {"role": "assistant", "content": "fine"}]
    full = encode_conversations(tok, [CHAT], max_len=10_000)[0]
    examples, report = encode_with_report(tok, [CHAT, long_prompt], max_len=len(full.ids) - 2)
    assert report.conversations == 2 and report.truncated == 2 and report.skipped == 1
    assert report.examples == 1 and len(examples) == 1
    assert examples[0].ids == full.ids[:-2] and examples[0].labels == full.labels[:-2]
    assert report.trained_tokens == sum(lab != IGNORE for lab in examples[0].labels[1:])
    assert "1 skipped" in str(report)
    with pytest.raises(ConfigError, match="max_len"):
        encode_conversations(tok, [CHAT], max_len=1)


def test_split_is_deterministic_and_disjoint():
    examples = [SftExample(ids=[i, i], labels=[i, i]) for i in range(50)]
    train, val = split_examples(examples, 0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert {e.ids[0] for e in train}.isdisjoint({e.ids[0] for e in val})
    assert split_examples(examples, 0.2, seed=3) == (train, val)
    assert split_examples(examples, 0.2, seed=4)[1] != val
    assert [e.ids[0] for e in train] == sorted(e.ids[0] for e in train)  # input order kept
    assert split_examples(examples, 0.0, seed=3) == (examples, [])
    with pytest.raises(DatasetError, match="no training example"):
        split_examples(examples[:1], 0.5, seed=0)
    with pytest.raises(ConfigError, match="val_fraction"):
        split_examples(examples, 1.0, seed=0)


# ------------------------------------------------------------------ packing
def make_examples(lengths: list[int]) -> list[SftExample]:
    """Example i has ids 1000*i + position and labels on its second half."""
    return [SftExample(ids=[1000 * i + t for t in range(n)],
                       labels=[IGNORE if t < n // 2 else 1000 * i + t for t in range(n)])
            for i, n in enumerate(lengths)]


def test_first_fit_decreasing():
    assert pack_rows([3, 8, 5, 2, 6], seq_len=10) == [[1, 3], [4, 0], [2]]
    rows = pack_rows([7] * 5, seq_len=7)
    assert rows == [[0], [1], [2], [3], [4]]


def test_packing_keeps_every_example_whole():
    lengths = [17, 3, 30, 9, 12, 5, 5, 28, 1, 2, 14, 22, 6, 8, 11, 32]
    examples = make_examples(lengths)
    batches = sft_batches(examples, seq_len=32, batch_size=3, seed=1)
    seen = []
    for batch in batches:
        assert batch.ids.shape[0] <= 3 and batch.ids.shape[1] <= 32
        for r in range(batch.ids.shape[0]):
            segs = batch.segments[r].tolist()
            real = [s for s in segs if s]
            assert segs[:len(real)] == real and real == sorted(real)  # padding only at the end
            assert set(real) == set(range(1, max(real) + 1))
            assert all(lab == IGNORE for lab, s in zip(batch.labels[r].tolist(), segs,
                                                       strict=True) if s == 0)
            for s in set(real):
                where = batch.segments[r] == s
                ids = batch.ids[r][where].tolist()
                i = ids[0] // 1000
                expected = examples[i]
                assert ids == expected.ids  # contiguous and complete: never split
                assert batch.positions[r][where].tolist() == list(range(len(ids)))
                labels = batch.labels[r][where].tolist()
                assert labels[0] == IGNORE and labels[1:] == expected.labels[1:]
                seen.append(i)
    assert sorted(seen) == list(range(len(examples)))
    assert sum(b.ids.shape[0] for b in batches) == len(pack_rows(lengths, 32)) < len(lengths)


def test_batches_are_shuffled_deterministically():
    examples = make_examples([5 + i % 7 for i in range(40)])
    for pack in (True, False):
        a = sft_batches(examples, 16, 4, pack=pack, seed=7)
        b = sft_batches(examples, 16, 4, pack=pack, seed=7)
        c = sft_batches(examples, 16, 4, pack=pack, seed=8)
        assert all(torch.equal(x.ids, y.ids) for x, y in zip(a, b, strict=True))
        assert any(not torch.equal(x.ids, y.ids) for x, y in zip(a, c, strict=False))


def test_unpacked_rows_hold_one_right_padded_example():
    examples = make_examples([4, 9, 6])
    [batch] = sft_batches(examples, seq_len=16, batch_size=8, pack=False)
    assert batch.ids.shape == (3, 9)
    for r in range(3):
        n = int((batch.segments[r] == 1).sum())
        assert batch.segments[r].tolist() == [1] * n + [0] * (9 - n)
        assert batch.positions[r, :n].tolist() == list(range(n))


def test_example_longer_than_seq_len_is_refused():
    with pytest.raises(ConfigError, match="example 1 has 20 tokens, more than seq_len 16"):
        sft_batches(make_examples([4, 20]), seq_len=16, batch_size=2)
    with pytest.raises(DatasetError, match="no examples"):
        sft_batches([], seq_len=16, batch_size=2)


# ------------------------------------------------------------------ loss
def test_packed_loss_equals_unpacked_loss(tok):
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-llama", vocab_size=tok.vocab_size, max_seq_len=128,
                                d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64,
                                init_std=0.3)
    model = Transformer(cfg).eval()
    chats = [CHAT, CHAT[:3], CHAT[1:3], [{"role": "user", "content": "hello"},
                                         {"role": "assistant", "content": "how are you? fine"}]]
    examples = encode_conversations(tok, chats, max_len=128)
    [packed] = sft_batches(examples, seq_len=128, batch_size=8, pack=True)
    [unpacked] = sft_batches(examples, seq_len=128, batch_size=8, pack=False)
    assert packed.ids.shape[0] < unpacked.ids.shape[0]
    assert packed.trained_tokens == unpacked.trained_tokens
    loss_packed, loss_unpacked = sft_loss(model, packed), sft_loss(model, unpacked)
    torch.testing.assert_close(loss_packed, loss_unpacked, rtol=1e-5, atol=1e-5)
    # The same number by hand: each example alone, summed CE over its trained targets.
    total, count = 0.0, 0
    for e in examples:
        logits = model(torch.tensor([e.ids]))[0, :-1]
        targets = torch.tensor(e.labels[1:])
        keep = targets != IGNORE
        total += torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
        count += int(keep.sum())
    torch.testing.assert_close(loss_packed, total / count, rtol=1e-5, atol=1e-5)


def test_loss_backpropagates_and_handles_no_targets(tok):
    cfg = ModelConfig.from_name("tiny-llama", vocab_size=tok.vocab_size, max_seq_len=64,
                                d_model=16, n_layer=1, n_head=2, d_ff=32)
    model = Transformer(cfg)
    [batch] = sft_batches(encode_conversations(tok, [CHAT], 64), 64, 1)
    loss = sft_loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and model.embed.weight.grad.abs().sum() > 0
    batch.labels.fill_(IGNORE)
    empty = sft_loss(model, batch)
    assert empty.item() == 0.0 and empty.requires_grad
