"""Text <-> token ids with Hugging Face `tokenizers`, loaded from a HF folder or GGUF metadata.

A `Tokenizer` wraps a `tokenizers.Tokenizer` (the "backend") and adds what a chat model needs on
top: BOS/EOS/pad ids, the set of ids that end a turn, and the model's chat template.

    tok = Tokenizer.from_file("models/smollm2")            # folder with tokenizer.json
    tok = Tokenizer.from_gguf_metadata(meta)               # meta: GGUF key -> python value
    tok.encode("Hello world")  # [19556, 905]
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from pagoda.errors import WeightsError
from pagoda.paths import atomic_write

# Tokens that end an assistant turn in common chat formats; any present in the vocab stop generation.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|end|>",
)

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
_TOKEN_TYPE_UNKNOWN, _TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED = 2, 3, 4

# Split regexes of byte-level vocabularies, keyed by GGUF `tokenizer.ggml.pre` (as llama.cpp names them).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_REGEXES = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template of one model."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        extra_eos_ids: Iterable[int] = (),
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.chat_template = chat_template
        self.bos_id = self._id_or_none(bos_token)
        self.eos_id = self._id_or_none(eos_token)
        self.pad_id = self._id_or_none(pad_token)
        turn_ends = (backend.token_to_id(token) for token in END_OF_TURN_TOKENS)
        self.eos_ids = frozenset(
            i for i in (self.eos_id, *turn_ends, *extra_eos_ids) if i is not None
        )
        self.special_ids = frozenset(
            i for i, added in backend.get_added_tokens_decoder().items() if added.special
        )
        self.add_bos_token, self.add_eos_token = self._special_tokens_added()

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a Hugging Face tokenizer: a folder with tokenizer.json (+ configs) or the file itself."""
        path = Path(path)
        folder, file = (path, path / "tokenizer.json") if path.is_dir() else (path.parent, path)
        if not file.is_file():
            raise WeightsError(f"tokenizer file not found: {file}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:
            raise WeightsError(f"cannot read tokenizer {file}: {_one_line(e)}") from e
        # Some tokenizer.json files keep the padding/truncation of their last training run
        # (all-MiniLM's pads everything to 128); transformers ignores them, and so do we.
        backend.no_padding()
        backend.no_truncation()
        config = _read_json(folder / "tokenizer_config.json")
        tokens = {
            name: _token_content(config.get(name))
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        if "add_bos_token" in config or "add_eos_token" in config:
            # As transformers does: explicit flags in the config override tokenizer.json's post-processor.
            backend.post_processor = _bos_eos_processor(
                backend,
                tokens["bos_token"] if config.get("add_bos_token") else None,
                tokens["eos_token"] if config.get("add_eos_token") else None,
            )
        return cls(
            backend,
            **tokens,
            chat_template=_chat_template_from_folder(folder, config),
            extra_eos_ids=_generation_eos_ids(folder),
        )

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer a GGUF file describes from its metadata (key -> decoded value)."""
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if kind is None or not tokens:
            raise WeightsError(
                "GGUF metadata has no tokenizer (tokenizer.ggml.model/tokens missing)"
            )
        token_types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        if kind == "gpt2":
            backend = _byte_level_bpe(tokens, meta.get("tokenizer.ggml.merges") or [])
            backend.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
        elif kind == "llama":
            backend = _sentencepiece_bpe(tokens, meta, token_types)
        else:
            raise WeightsError(
                f"unsupported GGUF tokenizer model {kind!r} (supported: 'gpt2', 'llama')"
            )
        _add_gguf_added_tokens(backend, tokens, token_types)

        def token(key: str) -> str | None:
            index = meta.get(f"tokenizer.ggml.{key}")
            return tokens[index] if index is not None and 0 <= index < len(tokens) else None

        bos, eos = token("bos_token_id"), token("eos_token_id")
        add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
        add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
        backend.post_processor = _bos_eos_processor(
            backend, bos if add_bos else None, eos if add_eos else None
        )
        turn_ends = (meta.get(f"tokenizer.ggml.{key}") for key in ("eot_token_id", "eom_token_id"))
        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            pad_token=token("padding_token_id"),
            unk_token=token("unknown_token_id"),
            chat_template=meta.get("tokenizer.chat_template"),
            extra_eos_ids=[i for i in turn_ends if i is not None],
        )

    # ------------------------------------------------------------- encoding
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds BOS (or whatever the model adds)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(
        self,
        texts: Sequence[str],
        add_special_tokens: bool = False,
        max_length: int | None = None,
    ) -> list[list[int]]:
        """Token ids of many texts at once (tokenizers runs them in parallel).

        `max_length` cuts each text's tokens so that, with the special tokens, at most that many
        remain: the end of the text goes, [CLS]/[SEP] stay (transformers' truncation).
        """
        texts = list(texts)
        if max_length is None:
            encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
            return [e.ids for e in encodings]
        room = max_length - (self.backend.num_special_tokens_to_add(is_pair=False)
                             if add_special_tokens else 0)
        if room < 1:
            raise ValueError(f"max_length {max_length} leaves no room for text tokens")
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        for e in encodings:
            e.truncate(room)  # no-op when shorter
        return [self.backend.post_process(e, add_special_tokens=add_special_tokens).ids
                for e in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; `skip_special_tokens` drops control tokens such as <|im_end|>."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry, None if absent."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary entry (as spelled in the vocab, e.g. 'Ġhello') of an id, None if out of range."""
        return self.backend.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ---------------------------------------------------------------- saving
    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write tokenizer.json + tokenizer_config.json that transformers' AutoTokenizer loads."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "clean_up_tokenization_spaces": False,
        }
        if self.encode("", add_special_tokens=True) == self._bos_eos_ids():
            # Only when the post-processor adds nothing but BOS/EOS: transformers rebuilds it from these.
            config["add_bos_token"] = self.add_bos_token
            config["add_eos_token"] = self.add_eos_token
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write(folder / "tokenizer.json", self.backend.to_str(pretty=True))
        atomic_write(
            folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False)
        )

    # --------------------------------------------------------------- helpers
    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def _special_tokens_added(self) -> tuple[bool, bool]:
        """(adds BOS, adds EOS): what the post-processor puts around an empty text."""
        ids = self.backend.encode("", add_special_tokens=True).ids
        add_bos = self.bos_id is not None and ids[:1] == [self.bos_id]
        rest = ids[1:] if add_bos else ids
        return add_bos, self.eos_id is not None and rest[-1:] == [self.eos_id]

    def _bos_eos_ids(self) -> list[int]:
        return [self.bos_id] * self.add_bos_token + [self.eos_id] * self.add_eos_token


# ------------------------------------------------------------------ HF folder
def _read_json(path: Path) -> dict[str, Any]:
    """A JSON config, {} when the file is absent; a corrupt one is a WeightsError naming the file."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"cannot read {path}: {_one_line(e)}") from e
    if not isinstance(data, dict):
        raise WeightsError(f"cannot read {path}: expected a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """tokenizer_config stores special tokens as a string or as a serialized AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template_from_folder(folder: Path, config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja (transformers >= 4.47 layout) or tokenizer_config's chat_template."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    # Several named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _generation_eos_ids(folder: Path) -> list[int]:
    """EOS ids from generation_config.json / config.json, where instruct models list their stop ids."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        value = _read_json(folder / name).get("eos_token_id")
        ids += value if isinstance(value, list) else [value] if isinstance(value, int) else []
    return ids


def _bos_eos_processor(
    backend: tokenizers.Tokenizer, bos: str | None, eos: str | None
) -> processors.TemplateProcessing:
    """Post-processor that wraps each text in the given BOS/EOS (as transformers builds it)."""
    specials = [(t, backend.token_to_id(t)) for t in (bos, eos) if t is not None]
    specials = [(t, i) for t, i in specials if i is not None]
    names = {t for t, _ in specials}
    head = f"{bos}:0 " if bos in names else ""
    tail = f" {eos}:0" if eos in names else ""
    pair_head = f" {bos}:1" if bos in names else ""
    pair_tail = f" {eos}:1" if eos in names else ""
    single = f"{head}$A:0{tail}"
    return processors.TemplateProcessing(
        single=single, pair=f"{single}{pair_head} $B:1{pair_tail}", special_tokens=specials
    )


# ----------------------------------------------------------------------- GGUF
def _byte_level_bpe(tokens: Sequence[str], merges: Sequence[str]) -> tokenizers.Tokenizer:
    """GPT-2 style BPE; tokens spelled outside the byte alphabet are respelled byte by byte."""
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)

    def spell(token: str) -> str:
        if set(token) <= alphabet:
            return token
        return "".join(piece for piece, _ in to_bytes.pre_tokenize_str(token))

    vocab = {spell(token): i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    backend.decoder = decoders.ByteLevel()
    return backend


def _byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """The split rule this vocabulary's merges were learned with (GGUF `tokenizer.ggml.pre`)."""
    if pre == "smollm":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _SPLIT_REGEXES:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_REGEXES[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _sentencepiece_bpe(
    tokens: Sequence[str], meta: Mapping[str, Any], token_types: Sequence[int]
) -> tokenizers.Tokenizer:
    """SentencePiece BPE (Llama 2, Mistral): '▁' for spaces, <0xNN> byte fallback."""
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = meta.get("tokenizer.ggml.merges")
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        pairs = _merges_from_scores(vocab, dict(zip(tokens, scores, strict=False)))
    unk = next(
        (t for t, kind in zip(tokens, token_types, strict=False) if kind == _TOKEN_TYPE_UNKNOWN),
        None,
    )
    model = models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True)
    backend = tokenizers.Tokenizer(model)
    add_prefix_space = meta.get("tokenizer.ggml.add_space_prefix", True)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix_space else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(
    vocab: Mapping[str, int], scores: Mapping[str, float]
) -> list[tuple[str, str]]:
    """Merges a SentencePiece vocab implies: every split of a token into two tokens, best score first."""
    merges = []
    for token, score in scores.items():
        local = [
            (token[:k], token[k:], score)
            for k in range(1, len(token))
            if token[:k] in vocab and token[k:] in vocab
        ]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_gguf_added_tokens(
    backend: tokenizers.Tokenizer, tokens: Sequence[str], token_types: Sequence[int]
) -> None:
    """Control tokens become special and user-defined ones plain added tokens: both stay whole."""
    vocab = backend.get_vocab()
    marked = [
        (token, kind == _TOKEN_TYPE_CONTROL)
        for token, kind in zip(tokens, token_types, strict=False)
        if kind in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED) and token in vocab
    ]
    specials = [AddedToken(t, special=True, normalized=False) for t, special in marked if special]
    plain = [AddedToken(t, special=False, normalized=False) for t, special in marked if not special]
    backend.add_special_tokens(specials)
    backend.add_tokens(plain)


# ---------------------------------------------------------------------- misc
def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
