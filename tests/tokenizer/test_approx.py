"""The tokenizer-free token count."""

from pagoda.tokenizer.approx import approx_tokens


def test_approx_tokens_counts_words_marks_and_cjk_characters():
    assert approx_tokens("Hello, world!") == 4
    assert approx_tokens("知识库") == 3
    assert approx_tokens("GPU加速 2x faster。") == 6
    assert approx_tokens("") == 0
