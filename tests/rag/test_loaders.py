import io
import zipfile
from pathlib import Path

import pytest

from pagoda.errors import DocumentError, PagodaError
from pagoda.rag.document import code_blocks
from pagoda.rag.loaders import EXTENSIONS, LOADERS, load_bytes, load_document

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared/data/tinyshakespeare/input.txt"

MARKDOWN = """Intro before any heading.

# Install

Get it.

## Linux

```bash
# not a heading: a shell comment

apt install pagoda
```

## macOS ##

brew install pagoda

Usage
=====

Run it.

Options
-------

Flags.
"""

HTML = """<!doctype html>
<html><head><title>Page title</title><style>p { color: red }</style></head>
<body>
<nav><a href="/">Home</a> | <a href="/menu">Menu</a></nav>
<h1>Guide</h1>
<p>Welcome,
   <b>reader</b>.</p>
<div>
  <h2>Install</h2><p>Step one.</p>
  <h3>Linux</h3>
  <ul><li>apt</li><li>snap</li></ul>
  <pre>x = 1

y = 2</pre>
</div>
<h2>Usage</h2>
<table><tr><th>flag</th><th>meaning</th></tr><tr><td>-v</td><td>verbose</td></tr></table>
<script>alert("not text")</script><!-- not text either -->
</body></html>
"""


def write(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def section_texts(doc) -> list[str]:
    return [doc.text[s.start:s.end] for s in doc.sections]


def pdf_bytes(pages: list[str]) -> bytes:
    """A real PDF written by fpdf2, one page per string (an empty string: a page with a drawing)."""
    fpdf = pytest.importorskip("fpdf")
    pdf = fpdf.FPDF()
    pdf.set_font("helvetica", size=12)
    for text in pages:
        pdf.add_page()
        if text:
            pdf.multi_cell(0, 8, text)
        else:
            pdf.rect(20, 20, 80, 40)
    return bytes(pdf.output())


def test_every_format_has_a_loader_and_extensions_name_only_those():
    assert set(EXTENSIONS.values()) == set(LOADERS) == {
        "txt", "md", "html", "pdf", "docx", "csv", "json"}


def test_plain_text_keeps_the_file_text(tmp_path):
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} is missing (shared/ data beside the checkout)")
    text = SHAKESPEARE.read_text(encoding="utf-8")[:20_000]
    path = write(tmp_path, "play.txt", text)
    doc = load_document(path)
    assert (doc.source, doc.format, doc.text) == (str(path), "txt", text)
    (section,) = doc.sections
    assert doc.text[section.start:section.end] == text.strip()
    assert (section.heading_path, section.page) == ((), None)


def test_text_encodings_and_newlines():
    assert load_bytes(b"\xef\xbb\xbfone\r\ntwo\rthree\r\n", "a.txt").text == "one\ntwo\nthree\n"
    assert load_bytes("知识库 text".encode("utf-16"), "b.txt").text == "知识库 text"


def test_markdown_sections_follow_headings_outside_code(tmp_path):
    doc = load_document(write(tmp_path, "guide.md", MARKDOWN))
    assert doc.text == MARKDOWN and doc.format == "md"
    assert [s.heading_path for s in doc.sections] == [
        (), ("Install",), ("Install", "Linux"), ("Install", "macOS"), ("Usage",),
        ("Usage", "Options")]
    texts = section_texts(doc)
    assert texts[0] == "Intro before any heading."
    assert texts[1] == "# Install\n\nGet it."
    assert texts[2].startswith("## Linux\n\n```bash\n# not a heading") and texts[2].endswith("```")
    assert texts[3] == "## macOS ##\n\nbrew install pagoda"
    assert texts[4] == "Usage\n=====\n\nRun it."
    assert texts[5] == "Options\n-------\n\nFlags."


def test_html_keeps_visible_text_and_nested_headings(tmp_path):
    doc = load_document(write(tmp_path, "page.html", HTML))
    for hidden in ("Home", "Menu", "color", "Page title", "alert", "not text"):
        assert hidden not in doc.text
    assert [s.heading_path for s in doc.sections] == [
        ("Guide",), ("Guide", "Install"), ("Guide", "Install", "Linux"), ("Guide", "Usage")]
    assert section_texts(doc) == [
        "Guide\n\nWelcome, reader.",
        "Install\n\nStep one.",
        "Linux\n\napt\n\nsnap\n\n```\nx = 1\n\ny = 2\n```",
        "Usage\n\nflag meaning\n\n-v verbose",
    ]


def test_html_pre_holding_fences_stays_one_code_block():
    html = "<h1>Doc tests</h1><p>Write:</p><pre>```rust\nlet x = 5;\n```</pre><p>Done.</p>"
    doc = load_bytes(html.encode(), "book.html")
    block = "````\n```rust\nlet x = 5;\n```\n````"
    start = doc.text.index(block)
    assert code_blocks(doc.text) == [(start, start + len(block))]


def test_pdf_has_one_section_per_page(tmp_path):
    path = write(tmp_path, "report.pdf", pdf_bytes(["The first page is about tea.",
                                                     "The second page is about coffee."]))
    doc = load_document(path)
    assert doc.format == "pdf" and [s.page for s in doc.sections] == [1, 2]
    first, second = section_texts(doc)
    assert "first page is about tea" in first and "second page is about coffee" in second


def test_docx_headings_come_from_heading_styles(tmp_path):
    docx = pytest.importorskip("docx")
    word = docx.Document()
    word.add_heading("Handbook", 0)  # the Title style
    word.add_heading("Leave", 1)
    word.add_paragraph("Everyone gets ten days a year.")
    table = word.add_table(rows=2, cols=2)
    for row, cells in zip(table.rows, [("Kind", "Days"), ("Annual", "10")], strict=True):
        for cell, value in zip(row.cells, cells, strict=True):
            cell.text = value
    word.add_heading("Sick leave", 2)
    word.add_paragraph("Tell your manager.")
    word.add_heading("Travel", 1)
    word.add_paragraph("Book through the portal.")
    buffer = io.BytesIO()
    word.save(buffer)
    doc = load_document(write(tmp_path, "handbook.docx", buffer.getvalue()))
    assert [s.heading_path for s in doc.sections] == [
        ("Handbook",), ("Handbook", "Leave"), ("Handbook", "Leave", "Sick leave"),
        ("Handbook", "Travel")]
    assert section_texts(doc)[1] == (
        "Leave\n\nEveryone gets ten days a year.\n\nKind | Days\nAnnual | 10")


def test_csv_rows_become_readable_records():
    csv_text = 'name,city,note\nAlice,Paris,likes tea\nBob,,"Comma, inside"\n'
    doc = load_bytes(csv_text.encode(), "people.csv")
    assert doc.text == ("name: Alice\ncity: Paris\nnote: likes tea\n\n"
                        "name: Bob\nnote: Comma, inside")
    tsv = load_bytes(b"name\tage\nAlice\t30\n", "people.tsv")
    assert tsv.text == "name: Alice\nage: 30"


def test_json_records_are_flattened_to_lines():
    data = ('[{"q": "Leave?", "a": "Ten days", "tags": ["hr", "leave"],'
            ' "meta": {"owner": "HR", "versions": [{"n": 1}], "ok": true}}, "plain"]')
    doc = load_bytes(data.encode(), "faq.json")
    assert doc.text == ("q: Leave?\na: Ten days\ntags: hr, leave\nmeta.owner: HR\n"
                        "meta.versions[0].n: 1\nmeta.ok: true\n\nplain")
    assert load_bytes(b'{"title": "\\u77e5\\u8bc6"}', "one.json").text == "title: 知识"


def test_content_wins_over_a_wrong_extension():
    assert load_bytes(pdf_bytes(["Tea."]), "notes.txt").format == "pdf"
    assert load_bytes(HTML.encode(), "page.txt").sections[0].heading_path == ("Guide",)


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("slides.pptx", b"PK\x03\x04 whatever", "unsupported file type .pptx"),
        ("README", b"hello", "unsupported file type (no extension)"),
        ("empty.txt", b"", "the file is empty"),
        ("blank.md", b"  \n\n \t", "there is no text in it"),
        ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary data"),
        ("latin1.txt", "café au lait".encode("latin-1"), "not UTF-8 text"),
        ("fake.pdf", b"just some text", "not a PDF file"),
        ("old.docx", b"\xd0\xcf\x11\xe0 an old .doc", "not a .docx file"),
        ("other.docx", _zip({"hello.txt": b"hi"}), "cannot be read as DOCX"),
        ("broken.json", b'{"unclosed": ', "cannot be read as JSON"),
        ("header-only.csv", b"a,b,c\n", "there is no text in it"),
        ("broken.pdf", b"%PDF-1.7\n1 0 obj << /Type /Pag", "broken.pdf: "),
    ],
)
def test_bad_files_raise_one_clear_error(tmp_path, name, content, message):
    path = write(tmp_path, name, content)
    with pytest.raises(DocumentError) as caught:
        load_document(path)
    assert isinstance(caught.value, PagodaError)
    text = str(caught.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_a_pdf_without_text_is_an_error():
    with pytest.raises(DocumentError, match="no extractable text"):
        load_bytes(pdf_bytes(["", ""]), "scan.pdf")


def test_missing_files_and_folders_are_errors(tmp_path):
    with pytest.raises(DocumentError, match="cannot read the file"):
        load_document(tmp_path / "missing.txt")
    with pytest.raises(DocumentError, match="cannot read the file"):
        load_document(tmp_path)
