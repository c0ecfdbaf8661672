"""`EmbeddingEngine`: texts in, unit-length float32 vectors out (sentence embeddings).

An encoder (a `Transformer` without an lm head, e.g. all-MiniLM in the BERT configuration)
reads each text wrapped in its special tokens ([CLS] ... [SEP]), cut to the window it was trained
with. The hidden states of the real tokens are averaged (mean pooling, as sentence-transformers
does for all-MiniLM and e5) and scaled to unit L2 norm, so a dot product is a cosine similarity.
A batch is as long as its longest text, so texts are sorted by length before batching (little
padding, which the attention mask hides anyway) and the vectors are returned in input order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pagoda.errors import ConfigError, InvalidRequestError
from pagoda.model.transformer import Transformer
from pagoda.tokenizer import Tokenizer


class EmbeddingEngine:
    """Batched mean-pooled, L2-normalised embeddings from an encoder and its tokenizer."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, name: str,
                 max_tokens: int | None = None, batch_size: int = 32) -> None:
        if model.lm_head is not None:
            raise ConfigError(f"{name} is a language model, not an encoder: it cannot embed "
                              "(use an embedding model such as minilm-l6)")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        # Tokens one input may have with its special tokens: the model's trained window.
        self.window = min(max_tokens or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self._specials = len(tokenizer.encode("", add_special_tokens=True))
        self._pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    @property
    def dimension(self) -> int:
        """Length of every vector."""
        return self.model.cfg.d_model

    @property
    def max_tokens(self) -> int:
        """Most text tokens (as `count_tokens` counts them) read from one input; the rest of a
        longer text is cut off, so a chunk is embedded whole when it has at most this many."""
        return self.window - self._specials

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` alone, without special tokens: lengths of pieces add up."""
        return len(self.tokenizer.encode(text))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors (len(texts), dimension), float32, in the order of `texts`."""
        ids = self.tokenizer.encode_batch(check_texts(texts), add_special_tokens=True,
                                          max_length=self.window)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        vectors = torch.empty(len(ids), self.dimension, dtype=torch.float32)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            vectors[rows] = self._embed_batch([ids[i] for i in rows])
        return vectors.numpy()

    @torch.inference_mode()
    def _embed_batch(self, batch: list[list[int]]) -> torch.Tensor:
        """Unit vectors (B, d) of token-id lists, right-padded to the longest into one pass."""
        B, T = len(batch), max(len(seq) for seq in batch)
        idx = torch.full((B, T), self._pad_id, dtype=torch.long)
        real = torch.zeros(B, T, dtype=torch.bool)  # True for real tokens, False for padding
        for row, seq in enumerate(batch):
            idx[row, :len(seq)] = torch.tensor(seq)
            real[row, :len(seq)] = True
        device = self.model.device
        real = real.to(device)
        hidden = self.model(idx.to(device), attention_mask=real).float()  # (B, T, d)
        weights = real.unsqueeze(-1).float()  # (B, T, 1)
        mean = (hidden * weights).sum(dim=1) / weights.sum(dim=1)  # (B, d)
        return F.normalize(mean, dim=-1).cpu()


def check_texts(texts: Sequence[str]) -> list[str]:
    """The texts as a list, or an InvalidRequestError naming the first bad one."""
    if isinstance(texts, str):
        raise InvalidRequestError("embed takes a list of texts; wrap a single text in a list")
    texts = list(texts)
    if not texts:
        raise InvalidRequestError("no texts to embed: the input list is empty")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidRequestError(f"input {i} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise InvalidRequestError(f"input {i} is empty: there is nothing to embed")
    return texts
