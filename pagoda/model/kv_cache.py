"""The KV cache protocol the model talks to, and the contiguous preallocated cache.

The model never knows how keys and values are stored: each attention layer hands its new
(k, v) to `cache.attend`, which stores them and attends over everything cached (by default with
the layer's own SDPA call on what `update` returns). The cache also says where each new token
sits (`positions`) and which cached keys it may see (`attention_mask`). The paged cache of the
serving engine implements the same methods, with its own kernel for decode steps.
"""

from collections.abc import Callable
from typing import Protocol

import torch

from pagoda.model.config import ModelConfig

# attend_fn(q, k, v, mask) -> (B, H, n_new, hd): the attention layer's own SDPA computation.
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class AttentionCache(Protocol):
    """What `Transformer.forward` needs from a KV cache."""

    def positions(self, n_new: int) -> torch.Tensor:
        """Absolute positions (B, n_new) of the tokens about to be written."""
        ...

    def attention_mask(self, n_new: int) -> torch.Tensor | None:
        """Bool mask (B, 1, n_new, S) of visible keys, or None for plain causal attention."""
        ...

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, n_new, hd) for layer; return all keys/values to attend to."""
        ...

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None, attend_fn: AttendFn) -> torch.Tensor:
        """Store k, v of the new tokens, then attention output (B, H, n_new, hd) for q."""
        ...

    def advance(self, n_new: int) -> None:
        """Commit the n_new tokens written by this forward pass."""
        ...


class KVCache:
    """Preallocated (layers, B, n_kv, max_len, hd) buffers; rows may be left-padded.

    Memory is reserved once for `max_len`, so each decode step writes in place instead of
    concatenating. Left padding lets prompts of different lengths share one batch: row b's
    first `pad[b]` slots are never attended to and its positions start at 0 after them.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int,
                 pad: list[int] | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        shape = (cfg.n_layer, batch_size, cfg.kv_heads, max_len, cfg.dim_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # slots written so far (the same for every row)
        self.sliding_window = cfg.sliding_window
        self.pad = torch.tensor(pad or [0] * batch_size, device=device)  # (B,)
        self.padded = any(pad or [])

    @property
    def bytes(self) -> int:
        """Memory reserved by the key and value buffers."""
        return 2 * self.k.numel() * self.k.element_size()

    def positions(self, n_new: int) -> torch.Tensor:
        slots = torch.arange(self.length, self.length + n_new, device=self.pad.device)
        return (slots.unsqueeze(0) - self.pad.unsqueeze(1)).clamp_min(0)  # (B, n_new)

    def attention_mask(self, n_new: int) -> torch.Tensor | None:
        total = self.length + n_new
        window = self.sliding_window is not None and total > self.sliding_window
        if not self.padded and not window and (n_new == 1 or self.length == 0):
            return None  # decode step or fresh prefill: SDPA's own causal handling suffices
        q_slot = torch.arange(self.length, total, device=self.pad.device)  # (n_new,)
        k_slot = torch.arange(total, device=self.pad.device)  # (S,)
        visible = k_slot.unsqueeze(0) <= q_slot.unsqueeze(1)  # (n_new, S) causal
        if window:
            visible &= k_slot.unsqueeze(0) > q_slot.unsqueeze(1) - self.sliding_window
        not_pad = k_slot.unsqueeze(0) >= self.pad.unsqueeze(1)  # (B, S)
        return (visible.unsqueeze(0) & not_pad.unsqueeze(1)).unsqueeze(1)  # (B, 1, n_new, S)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_new, end = k.shape[2], self.length + k.shape[2]
        keys, values = self.k[layer], self.v[layer]  # (B, n_kv, max_len, hd) views
        keys.narrow(2, self.length, n_new).copy_(k)  # narrow+copy_: a fraction of __setitem__'s cost
        values.narrow(2, self.length, n_new).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None, attend_fn: AttendFn) -> torch.Tensor:
        k, v = self.update(layer, k, v)
        return attend_fn(q, k, v, mask)

    def advance(self, n_new: int) -> None:
        self.length += n_new
