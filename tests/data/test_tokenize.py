"""Corpus tokenizing: nanoGPT's character split, exact round trips, worker-count determinism,
document-level validation split, big vocabularies, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from pagoda.data.shards import TokenShards
from pagoda.data.tokenize import is_validation, load_tokenizer, tokenize_corpus
from pagoda.errors import ConfigError
from pagoda.tokenizer import Tokenizer
from pagoda.tokenizer.corpus import CorpusError
from pagoda.tokenizer.train import train_tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared/data/tinyshakespeare/input.txt"


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("char")
    train_tokenizer([SHAKESPEARE], None, out, kind="char")
    return out


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bpe")
    train_tokenizer([SHAKESPEARE], 400, out)
    return out


@pytest.fixture
def jsonl(tmp_path) -> Path:
    """Tiny Shakespeare's paragraphs as 200 JSONL documents (some of them non-ASCII)."""
    paragraphs = SHAKESPEARE.read_text().split("\n\n")[:200]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": p + " ¿😀?"}) + "\n" for p in paragraphs))
    return path


def texts(folder: Path, split: str) -> str:
    shards = TokenShards.open(folder, split)
    return Tokenizer.from_file(shards.tokenizer_path).decode(shards.read(0, len(shards)).tolist())


def test_single_text_file_splits_tokens_like_nanogpt(char_tok, tmp_path):
    index = tokenize_corpus([SHAKESPEARE], char_tok, tmp_path, val_fraction=0.1, workers=1)
    assert index["dtype"] == "uint16" and index["vocab_size"] == 65 and index["eot_id"] is None
    assert {n: (s["tokens"], s["documents"]) for n, s in index["splits"].items()} == {
        "train": (1_003_854, 1), "val": (111_540, 1)}
    assert texts(tmp_path, "train") + texts(tmp_path, "val") == SHAKESPEARE.read_text()
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}


def test_documents_round_trip_with_separators_before_each(bpe_tok, jsonl, tmp_path):
    index = tokenize_corpus([jsonl], bpe_tok, tmp_path, val_fraction=0.2, workers=1,
                            shard_tokens=5000)
    assert index["eot_id"] == 0 and len(index["splits"]["train"]["files"]) > 1
    documents = [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]
    val = [d for i, d in enumerate(documents) if is_validation(i, 0.2)]
    train = [d for i, d in enumerate(documents) if not is_validation(i, 0.2)]
    assert 20 < len(val) < 60 and index["splits"]["val"]["documents"] == len(val)
    assert texts(tmp_path, "train") == "".join("<|endoftext|>" + d for d in train)
    assert texts(tmp_path, "val") == "".join("<|endoftext|>" + d for d in val)


def test_output_does_not_depend_on_worker_count(bpe_tok, jsonl, tmp_path, monkeypatch):
    monkeypatch.setattr("pagoda.data.tokenize.BATCH_BYTES", 4096)  # many batches in flight
    play = tmp_path / "play.txt"
    play.write_text(SHAKESPEARE.read_text()[:100_000])
    for workers in (1, 2):
        tokenize_corpus([jsonl, play], bpe_tok, tmp_path / str(workers),
                        workers=workers, val_fraction=0.3, shard_tokens=5_000)
    one, two = sorted((tmp_path / "1").iterdir()), sorted((tmp_path / "2").iterdir())
    assert [p.name for p in one] == [p.name for p in two] and len(one) > 5
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two, strict=True))


def test_vocabulary_over_65536_is_stored_as_uint32(tmp_path):
    vocab = {chr(0x10000 + i): i for i in range(70_000)}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab))
    backend.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), "isolated")
    (tmp_path / "doc.txt").write_text("".join(chr(0x10000 + i) for i in range(65_530, 65_540)))
    index = tokenize_corpus([tmp_path / "doc.txt"], Tokenizer(backend), tmp_path / "out",
                            val_fraction=0, workers=1)
    shards = TokenShards.open(tmp_path / "out")
    assert index["dtype"] == "uint32" and shards.read(0, 10).tolist() == list(range(65_530, 65_540))


def test_load_tokenizer_takes_folders_and_files(bpe_tok):
    folder, file = load_tokenizer(bpe_tok), load_tokenizer(bpe_tok / "tokenizer.json")
    assert folder.vocab_size == file.vocab_size == 400


@pytest.mark.parametrize("case, error, match", [
    ("missing", CorpusError, "no such file"),
    ("malformed", CorpusError, r"bad\.jsonl:2: not valid JSON"),
    ("unknown_char", CorpusError, "cannot be tokenized"),
    ("fraction", ConfigError, "validation fraction"),
    ("out_file", ConfigError, "not a folder"),
    ("all_val", CorpusError, "every document went to validation"),
])
def test_bad_input_is_one_clear_error(char_tok, tmp_path, case, error, match):
    good = tmp_path / "good.txt"
    good.write_text("To be, or not to be\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "zh.txt").write_text("你好\n")
    (tmp_path / "file").touch()
    args = {"inputs": [good, good], "out_dir": tmp_path / "out", "val_fraction": 0.0}
    args.update({"missing": {"inputs": [tmp_path / "nope.txt"]},
                 "malformed": {"inputs": [tmp_path / "bad.jsonl"]},
                 "unknown_char": {"inputs": [tmp_path / "zh.txt"]},
                 "fraction": {"val_fraction": 1.0}, "out_file": {"out_dir": tmp_path / "file"},
                 "all_val": {"val_fraction": 0.999999}}[case])
    with pytest.raises(error, match=match):
        tokenize_corpus(tokenizer=char_tok, workers=1, **args)
    assert not list((tmp_path / "out").glob("*"))  # nothing half-written is left
