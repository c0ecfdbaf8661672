"""Prompt tuning (Lester et al. 2021) and P-Tuning v2 (Liu et al. 2022): train a few virtual
tokens while every weight of the model stays frozen.

- `SoftPrompt`: n trainable embeddings placed before the input (fed through `inputs_embeds`),
  initialised from the embeddings of real tokens (a text, or tokens sampled from the vocabulary).
- `PrefixTuning`: trainable keys and values in every layer that each token attends to, optionally
  produced by a reparameterisation MLP while training (PEFT's `prefix_projection`).

Both reduce to the same thing at attention time: n extra keys/values per layer before the text.
A soft prompt's are what the frozen model computes for the virtual tokens (they only see each
other, so they do not depend on the text); a prefix's are parameters. `PrefixCache` is an
`AttentionCache` that holds them, differentiably, before the tokens' own, so training needs no
model change, packed rows each see the prefix, and a batch computes the soft prompt once;
`PrefixKVCache` is the decode-time cache pre-filled with them (`generate_ids`). As in PEFT the
text starts at position n. `save_virtual_tokens` writes PEFT's layout (adapter_config.json +
adapter_model.safetensors holding `prompt_embeddings`), so `peft` loads what Pagoda trains.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from pagoda.errors import ConfigError, ContextLengthError, InvalidRequestError, WeightsError
from pagoda.model.config import ModelConfig
from pagoda.model.hf_checkpoint import atomic_json, atomic_safetensors
from pagoda.model.kv_cache import AttendFn, KVCache
from pagoda.model.transformer import Transformer
from pagoda.tokenizer import Tokenizer

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TENSOR = "prompt_embeddings"  # PEFT's name for both methods' saved tensor
METHODS = {"prompt": "PROMPT_TUNING", "ptuning": "PREFIX_TUNING"}  # ours -> PEFT's peft_type

KeyValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (B, n_kv, P, hd) each


# ------------------------------------------------------------------ caches
class PrefixCache:
    """`AttentionCache` for one whole-sequence pass: each layer's prefix keys/values come first
    and every token sees them; then causal attention within the token's own segment.

    `positions` (B, T) are the tokens' absolute positions; `segments` (B, T), if given, keep
    packed examples apart (0 is padding). Gradients flow into the prefix tensors.
    """

    def __init__(self, prefix: KeyValues, positions: torch.Tensor,
                 segments: torch.Tensor | None = None, sliding_window: int | None = None) -> None:
        self.prefix = prefix
        self._positions = positions
        self.segments = segments
        self.sliding_window = sliding_window

    def positions(self, n_new: int) -> torch.Tensor:
        if self._positions.shape[1] != n_new:
            raise ValueError(f"PrefixCache holds positions for {self._positions.shape[1]} "
                             f"tokens, the pass has {n_new}")
        return self._positions

    def attention_mask(self, n_new: int) -> torch.Tensor:
        B, P = self._positions.shape[0], self.prefix[0][0].shape[2]
        device = self._positions.device
        slot = torch.arange(n_new, device=device)
        visible = (slot[None, :] <= slot[:, None]).expand(B, n_new, n_new)  # (B, T, T) causal
        if self.segments is not None:
            seg = self.segments.to(device)
            visible = visible & (seg[:, :, None] == seg[:, None, :])
        if self.sliding_window is not None:
            pos = self._positions
            visible = visible & (pos[:, None, :] > pos[:, :, None] - self.sliding_window)
        prefix = torch.ones(B, n_new, P, dtype=torch.bool, device=device)
        return torch.cat([prefix, visible], dim=2)[:, None]  # (B, 1, T, P + T)

    def update(self, layer: int, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pk, pv = self.prefix[layer]
        B = k.shape[0]
        return (torch.cat([pk.expand(B, -1, -1, -1), k], dim=2),
                torch.cat([pv.expand(B, -1, -1, -1), v], dim=2))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None, attend_fn: AttendFn) -> torch.Tensor:
        k, v = self.update(layer, k, v)
        return attend_fn(q, k, v, mask)

    def advance(self, n_new: int) -> None:
        """Nothing to commit: the cache lives for one pass."""


class _RecordingCache:
    """Plain causal attention over a fresh sequence that keeps each layer's keys and values
    (with their autograd graph): how a soft prompt becomes a prefix."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def positions(self, n_new: int) -> torch.Tensor:
        return torch.arange(n_new, device=self.device)[None]

    def attention_mask(self, n_new: int) -> None:
        return None  # SDPA's causal attention over the fresh sequence

    def update(self, layer: int, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.kv[layer] = (k, v)
        return k, v

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None, attend_fn: AttendFn) -> torch.Tensor:
        k, v = self.update(layer, k, v)
        return attend_fn(q, k, v, mask)

    def advance(self, n_new: int) -> None:
        """One pass only."""


class PrefixKVCache(KVCache):
    """A `KVCache` whose first P slots hold the prefix; rows may be left-padded after it.

    Layout per row: [prefix P][padding][tokens]. Every query sees the prefix, never the
    padding; token positions continue after the prefix (P, P+1, ...), as in training.
    """

    def __init__(self, cfg: ModelConfig, prefix: KeyValues, batch_size: int, max_new: int,
                 pad: list[int] | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        P = prefix[0][0].shape[2]
        pad = pad or [0] * batch_size
        super().__init__(cfg, batch_size, P + max_new, pad=[P + p for p in pad], device=device,
                         dtype=dtype)
        self.prefix_len = P
        self.padded = any(pad)
        for layer, (k, v) in enumerate(prefix):
            self.k[layer, :, :, :P] = k.to(dtype)
            self.v[layer, :, :, :P] = v.to(dtype)
        self.length = P

    def positions(self, n_new: int) -> torch.Tensor:
        return super().positions(n_new) + self.prefix_len

    def attention_mask(self, n_new: int) -> torch.Tensor | None:
        mask = super().attention_mask(n_new)  # hides slots before P + pad: give P back
        if mask is not None:
            mask[..., :self.prefix_len] = True
        return mask


# ------------------------------------------------------------------ methods
class VirtualTokens(nn.Module):
    """What both methods share: a per-layer prefix, the forward pass and decoding over it."""

    method: str = ""

    def __init__(self, cfg: ModelConfig, num_virtual_tokens: int) -> None:
        super().__init__()
        if num_virtual_tokens < 1:
            raise ConfigError(f"num_virtual_tokens must be positive, got {num_virtual_tokens}")
        if not cfg.causal or not cfg.lm_head:
            raise ConfigError(f"model '{cfg.name}' is not a causal language model: prompt "
                              "tuning needs one")
        self.cfg = cfg
        self.num_virtual_tokens = num_virtual_tokens

    def prefix(self, model: Transformer) -> KeyValues:
        """Per-layer keys and values (1, n_kv, P, hd) in the model's dtype."""
        raise NotImplementedError

    def saved_tensor(self, model: Transformer) -> torch.Tensor:
        """The tensor PEFT stores as `prompt_embeddings` (inference form, no MLP)."""
        raise NotImplementedError

    def logits(self, model: Transformer, ids: torch.Tensor, positions: torch.Tensor | None = None,
               segments: torch.Tensor | None = None,
               keep: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) of ids (B, T) read after the virtual tokens; `positions` count
        from 0 at each example's start (packed rows restart them per segment); `keep` selects
        positions as in Transformer.forward."""
        B, T = ids.shape
        if positions is None:
            positions = torch.arange(T, device=ids.device).expand(B, T)
        P = self.num_virtual_tokens
        if int(positions.max()) + P >= self.cfg.max_seq_len:
            raise ContextLengthError(f"{P} virtual tokens + {int(positions.max()) + 1} tokens "
                                     f"exceed the model's context of {self.cfg.max_seq_len}")
        window = self.cfg.sliding_window
        cache = PrefixCache(self.prefix(model), positions + P, segments, window)
        return model(ids, cache=cache, keep=keep)


class SoftPrompt(VirtualTokens):
    """n trainable input embeddings before the text (Lester et al.): (n, d_model) parameters."""

    method = "prompt"

    def __init__(self, cfg: ModelConfig, num_virtual_tokens: int,
                 init: torch.Tensor | None = None) -> None:
        super().__init__(cfg, num_virtual_tokens)
        if init is None:
            init = torch.randn(num_virtual_tokens, cfg.d_model) * cfg.init_std
        if tuple(init.shape) != (num_virtual_tokens, cfg.d_model):
            raise ConfigError(f"soft prompt init has shape {tuple(init.shape)}, expected "
                              f"({num_virtual_tokens}, {cfg.d_model})")
        self.weight = nn.Parameter(init.detach().float().clone())  # fp32 master copy

    def prefix(self, model: Transformer) -> KeyValues:
        recorder = _RecordingCache(model.device)
        embeds = self.weight.to(device=model.device, dtype=model.dtype)[None]  # (1, P, d)
        model(None, cache=recorder, last_only=True, inputs_embeds=embeds)
        return [recorder.kv[layer] for layer in range(self.cfg.n_layer)]

    def saved_tensor(self, model: Transformer) -> torch.Tensor:
        return self.weight.detach()


class PrefixTuning(VirtualTokens):
    """Trainable keys and values for every layer (P-Tuning v2 / prefix tuning).

    Stored flat as PEFT does: (P, n_layer * 2 * n_kv * head_dim), layer-major, keys before
    values. With `projection_dim` the flat prefix is an MLP of P trainable embeddings
    (Linear, tanh, Linear), which trains more stably; saving keeps only its output.
    """

    method = "ptuning"

    def __init__(self, cfg: ModelConfig, num_virtual_tokens: int, init: torch.Tensor | None = None,
                 projection_dim: int = 0) -> None:
        super().__init__(cfg, num_virtual_tokens)
        if projection_dim < 0:
            raise ConfigError(f"projection_dim must be 0 (off) or positive, got {projection_dim}")
        width = self.width
        rows = cfg.d_model if projection_dim else width
        if init is None:
            init = torch.randn(num_virtual_tokens, rows) * cfg.init_std
        if tuple(init.shape) != (num_virtual_tokens, rows):
            raise ConfigError(f"prefix init has shape {tuple(init.shape)}, expected "
                              f"({num_virtual_tokens}, {rows})")
        self.projection_dim = projection_dim
        self.weight = nn.Parameter(init.detach().float().clone())
        self.mlp = (nn.Sequential(nn.Linear(cfg.d_model, projection_dim), nn.Tanh(),
                                  nn.Linear(projection_dim, width))
                    if projection_dim else None)

    @property
    def width(self) -> int:
        """Numbers per virtual token: keys and values of every layer."""
        return self.cfg.n_layer * 2 * self.cfg.kv_heads * self.cfg.dim_head

    def flat(self) -> torch.Tensor:
        """The prefix as PEFT stores it: (P, n_layer * 2 * n_kv * hd)."""
        return self.weight if self.mlp is None else self.mlp(self.weight)

    def prefix(self, model: Transformer) -> KeyValues:
        cfg, P = self.cfg, self.num_virtual_tokens
        flat = self.flat().to(device=model.device, dtype=model.dtype)
        kv = flat.view(P, cfg.n_layer * 2, cfg.kv_heads, cfg.dim_head).permute(1, 2, 0, 3)
        return [(kv[2 * i][None], kv[2 * i + 1][None]) for i in range(cfg.n_layer)]

    def saved_tensor(self, model: Transformer) -> torch.Tensor:
        return self.flat().detach()


def _init_ids(model: Transformer, n: int, tokenizer: Tokenizer | None, init_text: str | None,
              seed: int) -> list[int]:
    """n token ids to initialise from: the text's tokens repeated or cut to n (PEFT's TEXT
    init), else n tokens sampled from the vocabulary (Lester et al.'s best init)."""
    if init_text:
        if tokenizer is None:
            raise ConfigError("initialising virtual tokens from a text needs the tokenizer")
        ids = tokenizer.encode(init_text)
        if not ids:
            raise ConfigError(f"the init text {init_text!r} encodes to no tokens")
        return (ids * math.ceil(n / len(ids)))[:n]
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(model.cfg.vocab_size, (n,), generator=generator).tolist()


@torch.no_grad()
def _real_key_values(model: Transformer, ids: list[int]) -> torch.Tensor:
    """What the model's layers compute as keys/values for `ids`, flat as PEFT stores a prefix:
    real activations are a far better start than noise (Li & Liang 2021)."""
    recorder = _RecordingCache(model.device)
    model(torch.tensor([ids], device=model.device), cache=recorder, last_only=True)
    kv = torch.stack([torch.stack(recorder.kv[i]) for i in range(model.cfg.n_layer)])
    # (L, 2, 1, n_kv, P, hd) -> (P, L * 2 * n_kv * hd)
    return kv[:, :, 0].permute(3, 0, 1, 2, 4).reshape(len(ids), -1).float()


def build_virtual_tokens(model: Transformer, method: str, num_virtual_tokens: int,
                         tokenizer: Tokenizer | None = None, init_text: str | None = None,
                         projection_dim: int = 0, seed: int = 0) -> VirtualTokens:
    """A soft prompt ("prompt") or prefix ("ptuning") initialised from real tokens of `model`."""
    if method not in METHODS:
        raise ConfigError(f"unknown virtual-token method {method!r}; choose prompt or ptuning")
    ids = _init_ids(model, num_virtual_tokens, tokenizer, init_text, seed)
    embeddings = model.embed.weight.detach()[torch.tensor(ids, device=model.device)].float().cpu()
    if method == "prompt":
        tokens: VirtualTokens = SoftPrompt(model.cfg, num_virtual_tokens, embeddings)
    elif projection_dim:
        with torch.random.fork_rng(devices=[]):  # seed the MLP's init, not the caller's RNG
            torch.manual_seed(seed)
            tokens = PrefixTuning(model.cfg, num_virtual_tokens, embeddings, projection_dim)
    else:
        tokens = PrefixTuning(model.cfg, num_virtual_tokens, _real_key_values(model, ids).cpu())
    return tokens.to(model.device)


class PromptTunedModel(nn.Module):
    """A frozen model plus virtual tokens, callable like the model on token ids: what the SFT
    loss (`forward(ids, positions=, segments=)`) and evaluation call."""

    def __init__(self, model: Transformer, tokens: VirtualTokens) -> None:
        super().__init__()
        self.model = model.requires_grad_(False)
        self.tokens = tokens

    def forward(self, ids: torch.Tensor, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.tokens.logits(self.model, ids, positions, segments, keep)


# ------------------------------------------------------------------ decoding
def _pick(logits: torch.Tensor, temperature: float, top_k: int,
          generator: torch.Generator | None) -> torch.Tensor:
    """Next ids (B,) from logits (B, V): argmax at temperature 0, else a top-k sample."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate_ids(model: Transformer, tokens: VirtualTokens | None, prompts: Sequence[list[int]],
                 max_new_tokens: int, eos_ids: Collection[int] = (), temperature: float = 0.0,
                 top_k: int = 0, seed: int | None = None) -> list[list[int]]:
    """Continue each prompt (a batch, left-padded) after the virtual tokens with a KV cache.

    The serving engine takes token ids only, so prompt-tuned models decode here. Greedy at
    temperature 0. Each result stops before its first id in `eos_ids` (which is not returned).
    """
    if not prompts or any(not p for p in prompts):
        raise InvalidRequestError("generate_ids needs at least one prompt, none of them empty")
    if max_new_tokens < 1:
        raise InvalidRequestError(f"max_new_tokens must be positive, got {max_new_tokens}")
    P = tokens.num_virtual_tokens if tokens is not None else 0
    longest = max(len(p) for p in prompts)
    if P + longest + max_new_tokens > model.cfg.max_seq_len:
        raise ContextLengthError(f"{P} virtual + {longest} prompt + {max_new_tokens} new tokens "
                                 f"exceed the model's context of {model.cfg.max_seq_len}")
    was_training = model.training
    model.eval()
    device, B = model.device, len(prompts)
    pad = [longest - len(p) for p in prompts]
    idx = torch.tensor([[0] * n + list(p) for n, p in zip(pad, prompts, strict=True)],
                       device=device)
    room = longest + max_new_tokens
    if tokens is None:
        cache: KVCache = KVCache(model.cfg, B, room, pad=pad, device=device, dtype=model.dtype)
    else:
        cache = PrefixKVCache(model.cfg, tokens.prefix(model), B, room, pad=pad, device=device,
                              dtype=model.dtype)
    generator = (torch.Generator(device=device).manual_seed(seed) if seed is not None else None)
    stop = set(eos_ids)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    try:
        logits = model(idx, cache=cache, last_only=True)[:, -1]
        for step in range(max_new_tokens):
            picked = _pick(logits, temperature, top_k, generator)
            for row, token in enumerate(picked.tolist()):
                if done[row]:
                    continue
                if token in stop:
                    done[row] = True
                else:
                    out[row].append(token)
            if all(done) or step == max_new_tokens - 1:
                break
            logits = model(picked[:, None], cache=cache)[:, -1]
    finally:
        model.train(was_training)
    return out


# ------------------------------------------------------------------ files
def _peft_config(tokens: VirtualTokens, base_model: str) -> dict:
    """adapter_config.json as PEFT writes it for these two methods (inference form)."""
    cfg = tokens.cfg
    config = {"peft_type": METHODS[tokens.method], "task_type": "CAUSAL_LM",
              "base_model_name_or_path": base_model or None, "revision": None,
              "inference_mode": True, "num_virtual_tokens": tokens.num_virtual_tokens,
              "num_transformer_submodules": 1, "num_layers": cfg.n_layer}
    if tokens.method == "prompt":
        config.update(token_dim=cfg.d_model, num_attention_heads=cfg.n_head,
                      prompt_tuning_init="RANDOM", prompt_tuning_init_text=None,
                      tokenizer_name_or_path=None)
    else:  # PEFT sizes a GQA model's prefix by its key/value heads
        token_dim = cfg.kv_heads * cfg.dim_head
        config.update(token_dim=token_dim, num_attention_heads=cfg.kv_heads,
                      encoder_hidden_size=token_dim, prefix_projection=False)
    return config


def save_virtual_tokens(tokens: VirtualTokens, model: Transformer, folder: str | Path,
                        base_model: str = "") -> Path:
    """Write PEFT's adapter_config.json + adapter_model.safetensors, each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_safetensors({TENSOR: tokens.saved_tensor(model).float()}, folder / WEIGHTS_FILE,
                        {"format": "pt", "pagoda_method": tokens.method})
    atomic_json(folder / CONFIG_FILE, _peft_config(tokens, base_model))
    return folder


def is_virtual_tokens_folder(folder: str | Path) -> bool:
    """Whether `folder` holds a saved soft prompt or prefix (not, say, a LoRA adapter)."""
    try:
        config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and config.get("peft_type") in METHODS.values()


def load_virtual_tokens(folder: str | Path, cfg: ModelConfig) -> VirtualTokens:
    """Read a folder written by `save_virtual_tokens` (or PEFT) for a model with config `cfg`."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{config_path}: no such file; is {folder} a saved prompt?") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"cannot read {config_path}: {exc}") from exc
    kind = {v: k for k, v in METHODS.items()}.get(config.get("peft_type"))
    if kind is None:
        raise WeightsError(f"{config_path}: peft_type {config.get('peft_type')!r} is not prompt "
                           "or prefix tuning")
    if config.get("num_layers") not in (None, cfg.n_layer):
        raise WeightsError(f"{folder} was trained for a {config['num_layers']}-layer model, "
                           f"this one has {cfg.n_layer}")
    try:
        tensor = load_file(weights_path)[TENSOR]
    except FileNotFoundError:
        raise WeightsError(f"{weights_path}: no such file") from None
    except KeyError:
        raise WeightsError(f"{weights_path} has no '{TENSOR}' tensor") from None
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{weights_path} is truncated or corrupt ({exc})") from exc
    n = tensor.shape[0]
    try:
        if kind == "prompt":
            return SoftPrompt(cfg, n, tensor)
        return PrefixTuning(cfg, n, tensor)
    except ConfigError as exc:
        raise WeightsError(f"{weights_path} does not fit this model: {exc}") from exc


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights count once."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
