"""Tokenizer storey: HF `tokenizers` BPE, chat templates, streaming detokenization."""

from pagoda.tokenizer.chat import ChatEncoding, encode_chat, render_chat
from pagoda.tokenizer.stream import StreamDecoder
from pagoda.tokenizer.tokenizer import Tokenizer

__all__ = ["ChatEncoding", "StreamDecoder", "Tokenizer", "encode_chat", "render_chat"]
