"""`ModelConfig`: every architecture Pagoda runs is one of these, not a separate code base.

GPT-2, Llama/SmolLM2/Mistral, Qwen2, the original "Attention Is All You Need" decoder and the
BERT encoder (MiniLM sentence embedders) differ only in the switches below (LitGPT's idea).
Presets are named configs; `from_name` looks them up.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pagoda.errors import ConfigError

PositionalEncoding = Literal["rope", "learned", "sinusoidal", "none"]
Norm = Literal["rmsnorm", "layernorm"]
Activation = Literal["silu", "gelu", "gelu_tanh", "relu"]


@dataclass
class ModelConfig:
    """Hyper-parameters of one Transformer; field comments say what each switch changes."""

    name: str = "custom"
    # Weight-layout family used by the loaders/savers: llama, mistral, qwen2, gpt2, bert.
    arch: str = "llama"
    vocab_size: int = 32000
    # Longest sequence (prompt + generation) the model is trained for; sizes the position tables.
    max_seq_len: int = 2048
    d_model: int = 768
    n_layer: int = 12
    n_head: int = 12
    # Key/value heads: n_head = MHA, 1 = MQA, anything dividing n_head = GQA. None means n_head.
    n_kv_head: int | None = None
    # Per-head width; None means d_model // n_head.
    head_dim: int | None = None
    # Hidden width of the feed-forward block (of each expert, for MoE).
    d_ff: int = 3072

    pos_encoding: PositionalEncoding = "rope"
    rope_theta: float = 10000.0
    # Llama-3.1 style long-context scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}, or {"freq_factors": [...]} (one divisor per frequency,
    # as GGUF files store it); None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    # Multiply token embeddings by sqrt(d_model) (the original Transformer does).
    scale_embeddings: bool = False
    # Token-type (segment) embeddings added to the token embeddings: BERT has 2 (sentence A/B),
    # XLM-R 1; 0 = none.
    type_vocab_size: int = 0
    # A norm over the summed embeddings before the first block (BERT's embeddings.LayerNorm):
    # post-norm blocks never normalise their input, so without it the first block sees raw sums.
    embed_norm: bool = False

    norm: Norm = "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm's additive bias (nanoGPT's bias=False drops it)
    # "pre": x + f(norm(x)) (GPT-2, Llama); "post": norm(x + f(x)) (original Transformer, BERT).
    norm_position: Literal["pre", "post"] = "pre"
    # A norm after the last block (pre-norm models need it; post-norm models already end normed).
    final_norm: bool = True

    activation: Activation = "silu"
    # Gated FFN: down(act(gate(x)) * up(x)) — SwiGLU when activation is silu.
    gated_ffn: bool = True
    attn_qkv_bias: bool = False  # Qwen2 and GPT-2 have q/k/v biases
    attn_out_bias: bool = False  # GPT-2 has an output-projection bias
    ffn_bias: bool = False  # GPT-2 has FFN biases
    tie_embeddings: bool = True  # lm_head shares the token-embedding matrix
    # False: no output projection, the model returns its hidden states (sentence encoders).
    lm_head: bool = True
    causal: bool = True  # False gives bidirectional (encoder) attention
    # Mistral's sliding-window attention: each token sees at most this many previous tokens.
    sliding_window: int | None = None

    dropout: float = 0.0  # embedding, attention and residual dropout while training

    # Mixture of experts: 0 = dense FFN; otherwise a top-k routed set of n_experts FFNs.
    n_experts: int = 0
    n_experts_per_token: int = 2
    moe_aux_loss_coef: float = 0.01  # weight of the Switch-style load-balancing loss

    init_std: float = 0.02
    # Token ids the model's training used; loaders fill them, generation reads them.
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # provenance (source file, quantization)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads after resolving the None default."""
        return self.n_kv_head or self.n_head

    @property
    def dim_head(self) -> int:
        """Per-head width after resolving the None default."""
        return self.head_dim or self.d_model // self.n_head

    def validate(self) -> None:
        """Reject impossible shapes with a message that names the fields."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(f"config '{self.name}': {message}")

        for name in ("vocab_size", "max_seq_len", "d_model", "n_layer", "n_head", "d_ff"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.head_dim is not None or self.d_model % self.n_head == 0,
             f"d_model ({self.d_model}) is not divisible by n_head ({self.n_head})")
        need(self.n_head % self.kv_heads == 0,
             f"n_head ({self.n_head}) is not a multiple of n_kv_head ({self.kv_heads})")
        need(self.pos_encoding != "rope" or self.dim_head % 2 == 0,
             f"RoPE needs an even head_dim, got {self.dim_head}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.n_experts == 0 or 0 < self.n_experts_per_token <= self.n_experts,
             f"n_experts_per_token ({self.n_experts_per_token}) must be in 1..n_experts "
             f"({self.n_experts})")
        for key, allowed in (("pos_encoding", PositionalEncoding), ("norm", Norm),
                             ("activation", Activation)):
            options = allowed.__args__
            need(getattr(self, key) in options,
                 f"{key} must be one of {', '.join(options)}, got {getattr(self, key)!r}")
        need(self.norm_position in ("pre", "post"),
             f"norm_position must be pre or post, got {self.norm_position!r}")
        need(self.type_vocab_size >= 0,
             f"type_vocab_size must be 0 or more, got {self.type_vocab_size}")
        need(self.lm_head or not self.tie_embeddings,
             "tie_embeddings needs an lm_head to tie (set tie_embeddings=False for encoders)")

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, used in checkpoints and `pagoda params --json`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict, naming any key that is not a config field."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(known))})")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Load a Pagoda config JSON file (what `to_dict` writes)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """A copy of a preset (see `PRESETS`), optionally with some fields overridden."""
        from pagoda.model.presets import PRESETS

        if name not in PRESETS:
            raise ConfigError(f"unknown preset '{name}'; known presets: {', '.join(PRESETS)}")
        return copy.deepcopy(PRESETS[name]).replace(**overrides)  # callers may mutate it


# Pagoda's own config file, saved with every checkpoint (the only one for configs HF lacks).
PAGODA_CONFIG = "pagoda_config.json"


def is_checkpoint_folder(path: Path) -> bool:
    """Whether `path` is a folder with a model config: Pagoda's own or a Hugging Face config.json
    (kept free of torch so the model store can ask without importing it)."""
    return (path / PAGODA_CONFIG).exists() or (path / "config.json").exists()
