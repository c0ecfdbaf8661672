"""Cleaning: NFKC with Chinese punctuation kept, HTML to text, control characters, whitespace,
boilerplate lines across documents, the picklable step, config errors."""

from __future__ import annotations

import pickle

import pytest

from pagoda.data.clean import (
    BoilerplateLines,
    CleanConfig,
    clean_step,
    clean_text,
    html_to_text,
    looks_like_html,
)
from pagoda.data.hashing import line_hashes
from pagoda.data.record import Drop, Record
from pagoda.errors import ConfigError

PAGE = """<!DOCTYPE html><html><head><title>Fish &amp; Chips</title>
<style>p { color: red }</style><script>var x = "<p>not text</p>";</script></head>
<body><nav><a href="/">Home</a> | <a href="/menu">Menu</a></nav>
<h1>Our  menu</h1>
<p>Fresh fish,
   fried to order &ndash; since 1984.</p><p>Prices &lt; &pound;10&nbsp;each.<br>Open daily.</p>
<ul><li>Cod</li><li>Haddock</li></ul>
<table><tr><td>Mon</td><td>12&ndash;22</td></tr><tr><td>Tue</td><td>closed</td></tr></table>
<pre>line one
line two</pre>
</body></html>"""


def test_nfkc_folds_full_width_letters_digits_ligatures_and_spaces():
    assert clean_text("ＡＢＣ １２３ ﬁne x\u00a0y\u3000z") == "ABC 123 fine x y z"


def test_chinese_punctuation_is_kept_by_default():
    text = "你好，世界！真的吗？是的：当然；（括号）……“引号”。"
    assert clean_text(text) == text
    folded = clean_text(text, CleanConfig(keep_cjk_punctuation=False))
    assert folded == "你好,世界!真的吗?是的:当然;(括号)......“引号”。"
    # letters next to kept punctuation are still folded
    assert clean_text("Ｐｙｔｈｏｎ，ｙｅｓ！") == "Python，yes！"


def test_nfkc_can_be_turned_off():
    assert clean_text("ＡＢＣ，", CleanConfig(nfkc=False)) == "ＡＢＣ，"


def test_html_to_text_keeps_blocks_drops_script_style_nav_and_unescapes():
    assert clean_text(PAGE) == ("Fish & Chips\n\nOur menu\n\n"
                                "Fresh fish, fried to order – since 1984.\n\n"
                                "Prices < £10 each.\nOpen daily.\n\nCod\nHaddock\n\n"
                                "Mon 12–22\nTue closed\n\nline one\nline two")


def test_html_is_detected_forced_or_left_alone():
    assert looks_like_html(PAGE) and looks_like_html("<b>bold</b> and <i>it</i>")
    assert not looks_like_html("if a<b and b>c then a<c")
    assert not looks_like_html("write <p> to start a paragraph")  # one tag is not a page
    assert clean_text("<b>x</b> <i>y</i>") == "x y"
    assert clean_text("<b>x</b> <i>y</i>", CleanConfig(detect_html=False)) == "<b>x</b> <i>y</i>"
    assert clean_text("a <p> b", is_html=True) == "a\n\nb"
    assert clean_text("<b>x</b> <i>y</i>", is_html=False) == "<b>x</b> <i>y</i>"


def test_text_already_extracted_from_html_is_not_parsed_again():
    """collect gives an HTML file's text with meta format "html": its line breaks stay, and a
    literal "<em>" in it is text."""
    record = Record("first line\nsecond <em> line", "page.html", meta={"format": "html"})
    assert clean_step()(record).text == "first line\nsecond <em> line"


def test_html_parser_handles_unclosed_and_malformed_markup():
    assert html_to_text("<p>open <b>bold <i>both</p><p>next") == "\n\nopen bold both\n\nnext"
    assert clean_text("<div>a</div><script>never closed") == "a"


def test_control_characters_are_removed_and_line_separators_become_newlines():
    text = "a\x00b\x07c\u200bd\ufeffe\r\nf\rg\x0ch\u2028i\x85j\tk"
    assert clean_text(text) == "abcde\nf\ng\nh\ni\nj k"


def test_whitespace_is_normalised():
    text = "  one  two\t\tthree   \n\n\n\n  four \t\n\nfive  "
    assert clean_text(text) == "one two three\n\nfour\n\nfive"
    assert clean_text("x\u2003\u2003y", CleanConfig(nfkc=False)) == "x y"  # em spaces


def test_step_appends_clean_and_drops_empty_records():
    step = clean_step()
    record = Record("  Hello \x00 world  ", "a.txt", meta={"page": 3}, steps=("read",))
    out = step(record)
    assert out.text == "Hello world" and out.steps == ("read", "clean")
    assert out.meta == {"page": 3}
    assert step(Record(" \x00\u200b \n\n", "b.txt")) == Drop("clean", "empty after cleaning")
    assert step(Record("<script>x()</script><style>p{}</style>", "c.html",
                       meta={"format": "html"})) == Drop("clean", "empty after cleaning")


NAMES = ("Ada", "Bea", "Cy", "Dot", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jo")


def corpus() -> list[str]:
    """Ten documents: a cookie banner in all, a dated footer in eight, a menu in two."""
    docs = []
    for i, name in enumerate(NAMES):
        lines = ["We use cookies to improve your experience. Accept all?",
                 f"Unique story by {name}: the river rose {i} feet overnight.",
                 "OK",  # too short to ever count
                 f"Another line only {name} wrote."]
        if i < 8:
            lines.append(f"© {2015 + i} Example News Ltd. All rights reserved.")
        if i < 2:
            lines.insert(0, "Home | World | Sport")
        docs.append(clean_text("\n".join(lines)))
    return docs


def test_boilerplate_lines_found_across_documents_and_removed():
    docs = corpus()
    boilerplate = BoilerplateLines()  # defaults: in >= 3 documents and >= 0.1 %
    for doc in docs:
        boilerplate.observe(doc)
    boilerplate.finalize()
    assert boilerplate.documents == 10
    assert boilerplate.hashes.size == 2  # the banner and the footer (years differ: digits -> 0)
    text, removed = boilerplate.remove(docs[0])
    assert removed == 2
    assert text == ("Home | World | Sport\nUnique story by Ada: the river rose 0 feet "
                    "overnight.\nOK\nAnother line only Ada wrote.")
    assert boilerplate.remove(docs[9]) == (docs[9].split("\n", 1)[1], 1)
    unique = "A text nobody else wrote.\nAnd a second line."
    assert boilerplate.remove(unique) == (unique, 0)
    # matching ignores case and surrounding spaces, as observing does
    assert boilerplate.remove("  WE USE COOKIES TO IMPROVE YOUR EXPERIENCE. ACCEPT ALL?")[1] == 1


def test_boilerplate_thresholds_are_configurable():
    docs = corpus()
    counted = BoilerplateLines(CleanConfig(boilerplate_min_docs=2))
    strict = BoilerplateLines(CleanConfig(boilerplate_min_fraction=0.9))
    for doc in docs:
        counted.observe(doc)
        strict.observe(doc)
    counted.finalize()
    strict.finalize()
    assert counted.hashes.size == 3  # the menu (2 documents) counts too
    assert strict.hashes.size == 1  # only the banner is in >= 90 % of documents


def test_boilerplate_hashes_are_stable_line_hashes():
    boilerplate = BoilerplateLines()
    for _ in range(3):
        boilerplate.observe("Accept All Cookies 2024")
    boilerplate.finalize()
    assert boilerplate.hashes.tolist() == line_hashes(["accept all cookies 0000"]).tolist()


def test_boilerplate_must_be_finalized_once_and_pickles_after():
    boilerplate = BoilerplateLines()
    with pytest.raises(RuntimeError):
        boilerplate.remove("text")
    for doc in corpus():
        boilerplate.observe(doc)
    boilerplate.finalize()
    with pytest.raises(RuntimeError):
        boilerplate.observe("more")
    copy = pickle.loads(pickle.dumps(boilerplate))
    assert copy.hashes.tolist() == boilerplate.hashes.tolist()
    assert copy.remove(corpus()[3]) == boilerplate.remove(corpus()[3])


def test_step_with_boilerplate_records_the_count_and_pickles():
    boilerplate = BoilerplateLines()
    for doc in corpus():
        boilerplate.observe(doc)
    boilerplate.finalize()
    step = pickle.loads(pickle.dumps(clean_step(CleanConfig(), boilerplate)))
    out = step(Record(corpus()[4], "d4"))
    assert out.meta == {"boilerplate_lines": 2} and "cookies" not in out.text
    only_boilerplate = "We use cookies to improve your experience. Accept all?"
    assert step(Record(only_boilerplate, "x")) == Drop("clean", "empty after cleaning")


def test_step_pickles_with_its_config():
    step = clean_step(CleanConfig(keep_cjk_punctuation=False))
    copy = pickle.loads(pickle.dumps(step))
    assert copy.config == step.config
    assert copy(Record("好，", "x")).text == "好,"


@pytest.mark.parametrize("field, value", [("boilerplate_min_docs", 1),
                                          ("boilerplate_min_docs", 2.5),
                                          ("boilerplate_min_fraction", -0.1),
                                          ("boilerplate_min_fraction", 1.5),
                                          ("boilerplate_min_chars", 0)])
def test_bad_config_values_raise_config_error(field, value):
    with pytest.raises(ConfigError, match=field):
        CleanConfig(**{field: value})
