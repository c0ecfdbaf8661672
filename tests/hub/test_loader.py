"""load_model on the pulled all-MiniLM-L6-v2: an encoder, its WordPiece tokenizer, its window."""

import json

import pytest

from pagoda.errors import WeightsError
from pagoda.hub.loader import SENTENCE_CONFIG, sentence_max_tokens


@pytest.mark.real_model
def test_minilm_loads_as_an_encoder_with_its_tokenizer(minilm):
    cfg = minilm.model.cfg
    assert (cfg.arch, cfg.d_model, cfg.n_layer, cfg.causal) == ("bert", 384, 6, False)
    assert minilm.model.lm_head is None and minilm.max_tokens == 256
    tok = minilm.tokenizer
    assert tok.encode("Hello world", add_special_tokens=True) == [101, 7592, 2088, 102]
    assert tok.encode("hi") == [7632]  # tokenizer.json's fixed padding to 128 is not applied
    assert tok.pad_id == 0 and tok.unk_token == "[UNK]"
    assert tok.decode(tok.encode("Hello, World!"), skip_special_tokens=True) == "hello, world!"


def test_sentence_config_gives_the_window(tmp_path):
    assert sentence_max_tokens(tmp_path) is None  # not a sentence embedder
    (tmp_path / SENTENCE_CONFIG).write_text(json.dumps({"max_seq_length": 128}))
    assert sentence_max_tokens(tmp_path) == 128


@pytest.mark.parametrize("text", ["{oops", json.dumps({"max_seq_length": "long"}),
                                  json.dumps({"max_seq_length": 0}), "[1]"])
def test_bad_sentence_config_is_a_weights_error(tmp_path, text):
    (tmp_path / SENTENCE_CONFIG).write_text(text)
    with pytest.raises(WeightsError, match=SENTENCE_CONFIG):
        sentence_max_tokens(tmp_path)
