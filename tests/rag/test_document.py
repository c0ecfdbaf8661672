from pagoda.rag.document import code_blocks, strip_span


def blocks(text: str) -> list[str]:
    return [text[start:end] for start, end in code_blocks(text)]


def test_fenced_code_blocks_are_found_whole():
    text = ("Use ```inline``` here.\n\n```python\nx = 1\n\n# not a heading\n```\n"
            "Between.\n  ~~~\n  tilde\n  ~~~\n````\n```\nnested\n```\n````\nAfter.")
    assert blocks(text) == ["```python\nx = 1\n\n# not a heading\n```", "~~~\n  tilde\n  ~~~",
                            "````\n```\nnested\n```\n````"]


def test_an_unclosed_fence_runs_to_the_end():
    assert blocks("Text.\n```\ncode\n\nmore code  \n") == ["```\ncode\n\nmore code"]


def test_strip_span_skips_surrounding_whitespace():
    assert strip_span("  a b \n", 0, 7) == (2, 5)
    assert strip_span("x \u3000 \n", 1, 5) is None
