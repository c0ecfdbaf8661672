"""The precompiled normalization map: what `tokenizers`' own Precompiled normalizer makes of it."""

import random
import unicodedata

import pytest
from tokenizers import normalizers

from pagoda.tokenizer.charsmap import precompiled_charsmap


def normalizer(mapping: dict[str, str]) -> normalizers.Normalizer:
    return normalizers.Precompiled(precompiled_charsmap(mapping))


def test_thousands_of_random_rules_all_hold():
    """Many keys sharing lead bytes (so bases must never collide), outputs of any length."""
    rng = random.Random(0)
    letters = [chr(cp) for cp in range(0x20, 0x30000)
               if unicodedata.category(chr(cp)).startswith("L")]
    keys = rng.sample(letters, 5000)
    outputs = ["", " ", "x", "ab", "\u00e9", "\u4e2d\u6587", "\U0001f600"]
    mapping = {k: rng.choice(outputs + [rng.choice(letters)]) for k in keys}
    norm = normalizer(mapping)
    for key, out in mapping.items():
        assert norm.normalize_str(key) == out, (key, out)
    unmapped = [c for c in rng.sample(letters, 2000) if c not in mapping]
    assert all(norm.normalize_str(c) == c for c in unmapped)
    text = "".join(keys[:50])
    assert norm.normalize_str(text) == "".join(mapping[k] for k in keys[:50])


def test_a_sequence_key_matches_a_whole_grapheme():
    norm = normalizer({"e\u0301": "\u00e9", "\uff21": "A", "\u00ad": ""})
    assert norm.normalize_str("cafe\u0301 \uff21\u00adB e") == "caf\u00e9 AB e"


@pytest.mark.parametrize("key", ["", "a\0b"])
def test_keys_must_be_non_empty_and_nul_free(key):
    with pytest.raises(ValueError, match="cannot be a key"):
        precompiled_charsmap({key: "x"})
