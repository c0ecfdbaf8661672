from itertools import pairwise
from pathlib import Path

import pytest

from pagoda.errors import ConfigError
from pagoda.rag.document import Document, Section
from pagoda.rag.loaders import load_bytes
from pagoda.rag.splitter import Splitter
from pagoda.tokenizer.approx import approx_tokens

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared/data/tinyshakespeare/input.txt"

CHINESE = ("知识库助手把企业文档切分成段落，再转换成向量。用户提问时，系统先检索相关段落；"
           "然后把它们和问题一起交给模型！模型一定能回答吗？不一定。资料里有答案时，它才回答，"
           "并注明出处。这里用的是半角问号吗?是的!最后一句;到此结束。")


def utf8_bytes(text: str) -> int:
    """A length that is not additive per word: UTF-8 bytes (three per Chinese character)."""
    return len(text.encode("utf-8"))


@pytest.fixture(scope="module")
def shakespeare() -> Document:
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} is missing (shared/ data beside the checkout)")
    return load_bytes(SHAKESPEARE.read_bytes()[:30_000], "tinyshakespeare.txt")


def check_chunks(doc: Document, splitter: Splitter) -> list:
    """Split `doc` and check what must hold for any document: exact slices that fit, in order,
    covering every non-space character of every section, the same on a second run."""
    chunks = splitter.split(doc)
    assert chunks == splitter.split(doc)
    covered = set()
    for chunk in chunks:
        assert chunk.text == doc.text[chunk.start:chunk.end] == chunk.text.strip() != ""
        assert splitter.length(chunk.text) <= splitter.chunk_size
        assert chunk.source == doc.source
        covered.update(range(chunk.start, chunk.end))
    assert [c.start for c in chunks] == sorted(c.start for c in chunks)
    for section in doc.sections:
        wanted = {i for i in range(section.start, section.end) if not doc.text[i].isspace()}
        assert wanted <= covered
    return chunks


@pytest.mark.parametrize(("size", "overlap"), [(6, 2), (40, 10), (300, 50)])
def test_shakespeare_chunks_fit_cover_and_never_cut_a_word(shakespeare, size, overlap):
    chunks = check_chunks(shakespeare, Splitter(size, overlap))
    padded = f" {shakespeare.text} "  # padded[i] is the character before text[i]
    for chunk in chunks:
        assert not (padded[chunk.start].isalnum() and padded[chunk.start + 1].isalnum())
        assert not (padded[chunk.end].isalnum() and padded[chunk.end + 1].isalnum())


def test_a_character_length_function_is_respected(shakespeare):
    chunks = check_chunks(shakespeare, Splitter(200, 40, length=len))
    assert max(len(c.text) for c in chunks) > 150  # packed, not one sentence per chunk


def test_overlap_is_whole_sentences_within_the_limit():
    sentences = [f"Sentence number {n} ends here." for n in range(1, 31)]
    doc = load_bytes(" ".join(sentences).encode(), "counting.txt")
    splitter = Splitter(chunk_size=20, chunk_overlap=8)
    chunks = check_chunks(doc, splitter)
    assert len(chunks) > 5
    for before, after in pairwise(chunks):
        shared = doc.text[after.start:before.end]
        assert after.start < before.end and 0 < approx_tokens(shared) <= 8
        assert shared in sentences  # exactly one whole sentence (each is 6 tokens)


def test_chinese_is_cut_after_sentence_marks():
    doc = load_bytes(CHINESE.encode(), "zh.txt")
    splitter = Splitter(chunk_size=90, chunk_overlap=0, length=utf8_bytes)
    chunks = check_chunks(doc, splitter)
    assert len(chunks) > 3
    for chunk in chunks:
        assert chunk.text[-1] in "。！？；!?;"
    assert any(c.text.endswith("半角问号吗?") for c in chunks)


def test_english_sentence_ends_skip_abbreviations_and_decimals():
    text = "Use e.g. this. Pi is 3.14 now! Is it next? Yes, it is."
    chunks = Splitter(chunk_size=16, chunk_overlap=0, length=len).split(load_bytes(
        text.encode(), "en.txt"))
    assert [c.text for c in chunks] == ["Use e.g. this.", "Pi is 3.14 now!", "Is it next?",
                                        "Yes, it is."]


def test_a_word_longer_than_a_chunk_is_cut_by_characters():
    doc = load_bytes(("start " + "x" * 45 + " end").encode(), "long.txt")
    chunks = check_chunks(doc, Splitter(chunk_size=10, chunk_overlap=0, length=len))
    assert [c.text for c in chunks] == ["start", "x" * 10, "x" * 10, "x" * 10, "x" * 10,
                                        "x" * 5, "end"]


CODE = "```python\nx = 1. Y = 2\n\n\nprint(x)  # Done. Next\n```"


def test_code_blocks_stay_whole():
    prose = " ".join(f"Line {n} of prose." for n in range(12))
    text = f"# Example\n\n{prose}\n\nThen:\n{CODE}\nAfter the code. {prose}\n"
    doc = load_bytes(text.encode(), "code.md")
    for size in (25, 40):
        chunks = check_chunks(doc, Splitter(chunk_size=size, chunk_overlap=5))
        assert sum(CODE in c.text for c in chunks) == 1
        assert not any("```" in c.text and CODE not in c.text for c in chunks)


def test_a_code_block_larger_than_a_chunk_is_cut_between_lines():
    lines = [f"value_{n} = compute({n}) + 1" for n in range(40)]
    text = "Intro.\n\n```\n" + "\n".join(lines) + "\n```\n\nOutro."
    doc = load_bytes(text.encode(), "big.md")
    chunks = check_chunks(doc, Splitter(chunk_size=30, chunk_overlap=10))
    inner = [c for c in chunks if "value_" in c.text]
    assert len(inner) > 3
    for chunk in inner:
        for line in chunk.text.split("\n"):
            assert line in lines or line == "```"


def test_chunks_carry_heading_paths():
    text = ("# Guide\n\n## Install\n\nDownload the installer and run it twice.\n\n"
            "### Linux\n\nUse the package manager on Linux machines.\n\n"
            "## Usage\n\nStart the program and read the help first.\n")
    doc = load_bytes(text.encode(), "guide.md")
    small = check_chunks(doc, Splitter(chunk_size=12, chunk_overlap=3))
    assert {(c.text.split("\n")[0], c.heading_path) for c in small} >= {
        ("## Install", ("Guide", "Install")), ("### Linux", ("Guide", "Install", "Linux")),
        ("## Usage", ("Guide", "Usage"))}
    for chunk in small:  # sections never overlap: a chunk stays inside one when they are big
        (section,) = [s for s in doc.sections if s.start <= chunk.start < s.end]
        assert chunk.end <= section.end and chunk.heading_path[:len(section.heading_path)] == (
            section.heading_path)
    (whole,) = check_chunks(doc, Splitter(chunk_size=500))
    assert whole.heading_path == ("Guide",) and whole.text == text.strip()
    merged = check_chunks(doc, Splitter(chunk_size=22, chunk_overlap=0))
    assert merged[0].text.startswith("# Guide\n\n## Install\n\nDownload")
    assert [c.heading_path for c in merged] == [  # a chunk of two sections: their common path
        ("Guide",), ("Guide", "Install", "Linux"), ("Guide", "Usage")]


def test_no_chunk_spans_two_pages():
    text = "Tea is grown on hills.\n\nCoffee is grown in the shade."
    doc = Document("book.pdf", "pdf", text, (Section(0, 22, (), 1), Section(24, len(text), (), 2)))
    chunks = check_chunks(doc, Splitter(chunk_size=500, chunk_overlap=50))
    assert [(c.text, c.page) for c in chunks] == [
        ("Tea is grown on hills.", 1), ("Coffee is grown in the shade.", 2)]


@pytest.mark.parametrize(("size", "overlap"), [(0, 0), (10, 10), (10, -1)])
def test_inconsistent_sizes_are_config_errors(size, overlap):
    with pytest.raises(ConfigError, match="chunk_overlap"):
        Splitter(chunk_size=size, chunk_overlap=overlap)


def test_paragraph_cuts_prefer_blank_lines():
    paragraphs = ["Alpha beta gamma delta. " * 3, "Epsilon zeta eta theta. " * 3,
                  "Iota kappa lambda mu. " * 3]
    doc = load_bytes("\n\n".join(p.strip() for p in paragraphs).encode(), "p.txt")
    chunks = check_chunks(doc, Splitter(chunk_size=16, chunk_overlap=0))
    assert [c.text for c in chunks] == [p.strip() for p in paragraphs]
