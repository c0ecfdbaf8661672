"""The retrieval benchmark's corpora and their held-out questions (see rag_retrieval.py).

Two corpora of real text nobody here wrote:

- `pydocs` (default): the Python 3.11 documentation's reST sources, Debian package
  `python3.11-doc` (installed with apt-get when missing and the script runs as root).
- `shakespeare`: ../shared/data/tinyshakespeare, cut into documents of consecutive speeches.

Before a document is indexed some of its text is taken out and becomes a question whose answer
is the text around the gap, so the question's own words are nowhere in the index:

- title (pydocs): every 3rd section title of at least 3 words is removed with its underline;
  gold = the chunks of that section's body (up to the next title).
- heldout: pydocs: every 4th prose paragraph of 2+ sentences loses one inner sentence of 8+
  words; shakespeare: every 4th speech of 3+ lines loses one inner line of 7+ words;
  gold = the chunks touching the gap.

Each question is a dict {kind, question, start, end, sentence} with [start, end] the character
range of the document (as indexed) whose chunks are gold.
"""

from __future__ import annotations

import itertools
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared/data/tinyshakespeare/input.txt"
PYDOCS_PACKAGE = "python3.11-doc"
PYDOCS_DIRS = (Path("/usr/share/doc/python3.11/html/_sources"),
               Path("/usr/share/doc/python3.11-doc/html/_sources"))
CORPORA = ("pydocs", "shakespeare")
TITLE_EVERY, HOLDOUT_EVERY = 3, 4
MIN_SECTION_CHARS = 300  # a removed title must head at least this much body text

_WORD = re.compile(r"[A-Za-z0-9']+")
_UNDERLINE = re.compile(r"([=\-~^\"'`#*+<>:._])\1{2,}")
_SENTENCE_END = re.compile(r"[.!?]\s+(?=[A-Z])")  # "e.g. json.dumps" does not end one
_ROLE = re.compile(r":[\w:.-]+:`~?([^`<]*?)\s*(?:<[^`>]*>)?`")  # :mod:`json`, :ref:`T <x>`
_LITERAL = re.compile(r"``([^`]*)``|`([^`<]*?)\s*(?:<[^`>]*>)?`_{0,2}|\*\*?([^*]+)\*\*?")
Question = dict


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def plain(text: str) -> str:
    """reST inline markup removed: roles, literals, links and emphasis become their text."""
    text = _ROLE.sub(lambda m: m[1], text)
    return " ".join(_LITERAL.sub(lambda m: m[1] or m[2] or m[3] or "", text).split())


# ------------------------------------------------------------------------------ pydocs
def pydocs_dir(install: bool = True) -> Path:
    """The reST sources, installing the Debian package first when it is missing (as root)."""
    found = next((d for d in PYDOCS_DIRS if d.is_dir()), None)
    if found is None and install and shutil.which("apt-get") and _is_root():
        print(f"installing {PYDOCS_PACKAGE} (the corpus) with apt-get ...", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-q", PYDOCS_PACKAGE], check=False,
                       stdout=subprocess.DEVNULL)
        found = next((d for d in PYDOCS_DIRS if d.is_dir()), None)
    if found is None:
        raise SystemExit(f"error: the pydocs corpus needs the Debian package {PYDOCS_PACKAGE} "
                         f"(its reST sources in {PYDOCS_DIRS[0]}); install it with `apt-get "
                         f"install {PYDOCS_PACKAGE}` as root, or run with --corpus shakespeare")
    return found


def _is_root() -> bool:
    import os

    return hasattr(os, "geteuid") and os.geteuid() == 0


def _title(block: str) -> str | None:
    """The title of a reST section-title block (optional overline, title, underline), else None."""
    lines = [ln.rstrip() for ln in block.split("\n")]
    if lines and _UNDERLINE.fullmatch(lines[0]) and len(lines) == 3:
        lines = lines[1:]
    if (len(lines) == 2 and lines[0].strip() and not lines[0].startswith(" ")
            and _UNDERLINE.fullmatch(lines[1]) and len(lines[1]) >= len(lines[0].strip())):
        return lines[0].strip()
    return None


def _prose(block: str) -> bool:
    """A paragraph of running text: not indented, not a directive, list, table or prompt."""
    first = block.lstrip("\n")
    return (bool(first) and not first[0].isspace()
            and not first.startswith(("..", ">>>", ":", "*", "-", "|", "+", "#", "="))
            and not re.match(r"\d+\.|\w\)", first) and len(words(block)) >= 20)


def pydocs_document(text: str, rng: random.Random, counters: list[int]) -> tuple[str, list]:
    """The document as indexed (titles and sentences taken out) and its questions."""
    parts: list[str] = []
    questions: list[Question] = []
    offset, pending = 0, None  # pending: a removed title waiting for its section's end

    def close(end: int) -> None:
        if pending is not None and end - pending["start"] >= MIN_SECTION_CHARS:
            questions.append({**pending, "end": end})

    for block in re.split(r"\n[ \t]*\n", text):
        if not block.strip():
            continue
        title = _title(block)
        if title is not None:
            close(offset)
            pending = None
            cleaned = plain(title)
            if len(words(cleaned)) >= 3:
                counters[0] += 1
                if counters[0] % TITLE_EVERY == 0:
                    pending = {"kind": "title", "question": cleaned, "sentence": cleaned,
                               "start": offset}
                    continue  # the title is not indexed
        elif _prose(block):
            cuts = [0, *(m.end() for m in _SENTENCE_END.finditer(block)), len(block)]
            spans = list(itertools.pairwise(cuts))
            inner = [i for i in range(1, len(spans)) if len(words(block[slice(*spans[i])])) >= 8]
            if len(spans) >= 2 and inner:
                counters[1] += 1
                if counters[1] % HOLDOUT_EVERY == 0:
                    i = rng.choice(inner)
                    sentence = block[slice(*spans[i])]
                    block = block[:spans[i][0]] + block[spans[i][1]:]
                    hole = offset + spans[i][0]
                    questions.append({"kind": "heldout", "question": plain(sentence),
                                      "sentence": " ".join(sentence.split()),
                                      "start": hole, "end": hole})
        if parts:
            offset += 2
        parts.append(block)
        offset += len(block)
    close(offset)
    return "\n\n".join(parts), questions


def load_pydocs(seed: int) -> tuple[list[tuple[str, bytes]], dict[str, list]]:
    root = pydocs_dir()
    rng = random.Random(seed)
    paths = sorted(root.rglob("*.rst.txt"))
    random.Random(seed).shuffle(paths)  # a mix of library, tutorial, howto, c-api ... first
    docs, held, counters = [], {}, [0, 0]
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        source = f"python-docs/{path.relative_to(root)}"
        body, questions = pydocs_document(text, rng, counters)
        docs.append((source, body.encode("utf-8")))
        held[source] = questions
    # A title used twice (e.g. "Module contents") does not say which section it means.
    counts: dict[str, int] = {}
    for qs in held.values():
        for q in qs:
            if q["kind"] == "title":
                counts[q["question"].lower()] = counts.get(q["question"].lower(), 0) + 1
    for source, qs in held.items():
        held[source] = [q for q in qs if q["kind"] != "title" or counts[q["question"].lower()] == 1]
    return docs, held


# ------------------------------------------------------------------------------ shakespeare
def load_shakespeare(seed: int, speeches_per_doc: int) -> tuple[list, dict[str, list]]:
    if not SHAKESPEARE.is_file():
        raise SystemExit(f"error: corpus not found at {SHAKESPEARE} (expected tinyshakespeare "
                         "input.txt in the shared data folder next to the repository)")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    speeches = [s.strip() for s in re.split(r"\n\s*\n", text) if s.strip()]
    rng = random.Random(seed)
    docs, held = [], {}
    for d, first in enumerate(range(0, len(speeches), speeches_per_doc)):
        source = f"tinyshakespeare/part-{d + 1:04d}.txt"
        parts, questions, offset = [], [], 0
        for j, speech in enumerate(speeches[first:first + speeches_per_doc]):
            lines = speech.split("\n")
            inner = [i for i in range(2, len(lines) - 1) if len(words(lines[i])) >= 7]
            if (first + j) % HOLDOUT_EVERY == 0 and inner:
                i = rng.choice(inner)
                line = lines.pop(i)
                hole = offset + sum(len(x) + 1 for x in lines[:i])  # where the next line starts
                questions.append({"kind": "heldout", "question": " ".join(words(line.lower())),
                                  "sentence": line.strip(), "start": hole, "end": hole})
            body = "\n".join(lines)
            parts.append(body)
            offset += len(body) + 2
        docs.append((source, "\n\n".join(parts).encode("utf-8")))
        held[source] = questions
    return docs, held


def load_corpus(name: str, seed: int, speeches_per_doc: int = 40):
    """(source, content) documents in ingest order, and per source its held-out questions."""
    if name == "pydocs":
        return load_pydocs(seed)
    return load_shakespeare(seed, speeches_per_doc)
