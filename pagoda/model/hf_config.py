"""Translate between Hugging Face `config.json` and `ModelConfig` (llama, mistral, qwen2, gpt2,
bert, xlm-roberta)."""

from typing import Any

from pagoda.errors import ConfigError
from pagoda.model.config import ModelConfig

HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertModel",  # the bare encoder: what sentence embedders (all-MiniLM) ship
    "xlm-roberta": "XLMRobertaModel",  # BERT with SentencePiece and shifted positions (e5)
}
# RoBERTa numbers positions from pad_token_id + 1, so its table has that many unused leading
# rows; Pagoda's table starts at the first real position (the loader drops those rows).
XLMR_PAD_ID = 1
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, float] | None]:
    """rope_theta and Llama-3 scaling, from either the v4 or the v5 (`rope_parameters`) layout."""
    params = hf.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in (None, "default", "llama3"):
        raise ConfigError(f"unsupported rope scaling {kind!r} (supported: default, llama3)")
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return theta, {k: float(scaling[k]) for k in keys}
    return theta, None


# transformers' config-class defaults for the fields a config.json may leave out.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "tie_word_embeddings": False},
    "mistral": {"max_position_embeddings": 131072, "tie_word_embeddings": False,
                "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "tie_word_embeddings": False,
              "sliding_window": 4096, "max_window_layers": 28},
    "bert": {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
             "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
             "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12},
}
_HF_DEFAULTS["xlm-roberta"] = {**_HF_DEFAULTS["bert"], "pad_token_id": XLMR_PAD_ID}


def _activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise ConfigError(f"unsupported activation {name!r} in config.json "
                          f"(supported: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def _sliding_window(hf: dict[str, Any], model_type: str) -> int | None:
    """The window every layer uses (None: full attention); mixed layer types are refused."""
    if model_type == "mistral":
        return hf["sliding_window"]
    if model_type != "qwen2" or not hf.get("use_sliding_window", False):
        return None  # transformers' Llama ignores sliding_window; Qwen2 needs the switch
    n_layer = hf["num_hidden_layers"]
    kinds = hf.get("layer_types") or ["sliding_attention" if i >= hf["max_window_layers"]
                                      else "full_attention" for i in range(n_layer)]
    if len(set(kinds)) > 1:
        raise ConfigError("config.json mixes full and sliding-window attention layers, "
                          "which Pagoda does not support")
    return hf["sliding_window"] if kinds[0] == "sliding_attention" else None


def _bert_config(hf: dict[str, Any], name: str, model_type: str) -> ModelConfig:
    """BERT encoder: learned positions, token types, LayerNorm on the embeddings, post-LayerNorm
    blocks with biases, exact GELU, bidirectional attention, no lm head (BertModel; XLM-R is
    the same network with its position table shifted past the padding index)."""
    hf = {**_HF_DEFAULTS[model_type], **hf}
    skipped = hf["pad_token_id"] + 1 if model_type == "xlm-roberta" else 0
    if skipped and hf["pad_token_id"] != XLMR_PAD_ID:
        raise ConfigError(f"unsupported pad_token_id {hf['pad_token_id']} for xlm-roberta "
                          f"(supported: {XLMR_PAD_ID})")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"unsupported position_embedding_type "
                          f"{hf['position_embedding_type']!r} (supported: absolute)")
    if hf.get("is_decoder", False):
        raise ConfigError("config.json describes a BERT decoder (is_decoder); "
                          "only the bidirectional encoder is supported")
    return ModelConfig(
        name=name, arch=model_type, vocab_size=hf["vocab_size"],
        max_seq_len=hf["max_position_embeddings"] - skipped, d_model=hf["hidden_size"],
        n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
        d_ff=hf["intermediate_size"], pos_encoding="learned",
        type_vocab_size=hf["type_vocab_size"], embed_norm=True, norm="layernorm",
        norm_eps=hf["layer_norm_eps"], norm_position="post", final_norm=False,
        activation=_activation(hf["hidden_act"]), gated_ffn=False, attn_qkv_bias=True,
        attn_out_bias=True, ffn_bias=True, tie_embeddings=False, lm_head=False, causal=False,
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))


def config_from_hf(hf: dict[str, Any], name: str = "hf-model") -> ModelConfig:
    """ModelConfig for a Hugging Face config.json dict; unsupported model types are refused."""
    model_type = hf.get("model_type")
    try:
        if model_type == "gpt2":
            d = hf["n_embd"]
            return ModelConfig(
                name=name, arch="gpt2", vocab_size=hf["vocab_size"],
                max_seq_len=hf.get("n_positions", 1024), d_model=d, n_layer=hf["n_layer"],
                n_head=hf["n_head"], d_ff=hf.get("n_inner") or 4 * d, pos_encoding="learned",
                norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                activation=_activation(hf.get("activation_function", "gelu_new")),
                gated_ffn=False, attn_qkv_bias=True, attn_out_bias=True, ffn_bias=True,
                tie_embeddings=hf.get("tie_word_embeddings", True),
                bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))
        if model_type in ("bert", "xlm-roberta"):
            return _bert_config(hf, name, model_type)
        if model_type in ("llama", "mistral", "qwen2"):
            hf = {**_HF_DEFAULTS[model_type], **hf}
            theta, scaling = _rope(hf)
            eos = hf.get("eos_token_id")
            llama_bias = model_type == "llama" and hf.get("attention_bias", False)
            return ModelConfig(
                name=name, arch=model_type, vocab_size=hf["vocab_size"],
                max_seq_len=hf["max_position_embeddings"], d_model=hf["hidden_size"],
                n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                head_dim=hf.get("head_dim"), d_ff=hf["intermediate_size"],
                rope_theta=theta, rope_scaling=scaling, norm="rmsnorm",
                norm_eps=hf.get("rms_norm_eps", 1e-6),
                activation=_activation(hf.get("hidden_act", "silu")), gated_ffn=True,
                attn_qkv_bias=model_type == "qwen2" or llama_bias, attn_out_bias=llama_bias,
                ffn_bias=model_type == "llama" and hf.get("mlp_bias", False),
                tie_embeddings=hf["tie_word_embeddings"],
                sliding_window=_sliding_window(hf, model_type),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=eos[0] if isinstance(eos, list) else eos)
    except KeyError as exc:
        raise ConfigError(f"config.json of a {model_type} model lacks the field {exc}") from exc
    raise ConfigError(f"unsupported model_type {model_type!r} in config.json "
                      f"(supported: {', '.join(HF_ARCHITECTURES)})")


def hf_compatible(cfg: ModelConfig) -> bool:
    """Whether `transformers` has a class that computes exactly this config."""
    shared = not cfg.n_experts and not cfg.scale_embeddings and \
        "freq_factors" not in (cfg.rope_scaling or {}) and (cfg.norm_bias or cfg.norm == "rmsnorm")
    mha = cfg.kv_heads == cfg.n_head and cfg.dim_head * cfg.n_head == cfg.d_model
    biased = cfg.attn_qkv_bias and cfg.attn_out_bias and cfg.ffn_bias
    if cfg.arch in ("bert", "xlm-roberta"):
        return shared and mha and biased and cfg.norm_position == "post" and \
            not cfg.final_norm and not cfg.causal and not cfg.lm_head and cfg.embed_norm and \
            cfg.type_vocab_size > 0 and cfg.pos_encoding == "learned" and \
            cfg.norm == "layernorm" and not cfg.gated_ffn and cfg.sliding_window is None
    common = shared and cfg.norm_position == "pre" and cfg.final_norm and cfg.causal and \
        cfg.lm_head and not cfg.embed_norm and not cfg.type_vocab_size
    if cfg.arch == "gpt2":
        return common and cfg.pos_encoding == "learned" and cfg.norm == "layernorm" and \
            not cfg.gated_ffn and biased and mha and cfg.sliding_window is None
    # Which biases each class has: Llama's attention_bias covers q/k/v and o; Mistral has none;
    # Qwen2 always has q/k/v biases only. Llama has no sliding window.
    biases = {
        "llama": cfg.attn_qkv_bias == cfg.attn_out_bias and cfg.sliding_window is None,
        "mistral": not (cfg.attn_qkv_bias or cfg.attn_out_bias or cfg.ffn_bias),
        "qwen2": cfg.attn_qkv_bias and not (cfg.attn_out_bias or cfg.ffn_bias),
    }
    if cfg.arch in biases:
        return common and cfg.pos_encoding == "rope" and cfg.norm == "rmsnorm" and \
            cfg.gated_ffn and biases[cfg.arch]
    return False


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json contents that `transformers.AutoConfig` reads back into the same model."""
    if not hf_compatible(cfg):
        raise ConfigError(f"config '{cfg.name}' has no Hugging Face equivalent "
                          "(MoE, sinusoidal, norms or switches its family lacks)")
    act = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}[cfg.activation]
    ids = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
           "tie_word_embeddings": cfg.tie_embeddings, "architectures": [HF_ARCHITECTURES[cfg.arch]],
           "model_type": cfg.arch, "torch_dtype": "float32"}
    if cfg.arch in ("bert", "xlm-roberta"):
        skipped = XLMR_PAD_ID + 1 if cfg.arch == "xlm-roberta" else 0
        pad = {"pad_token_id": XLMR_PAD_ID} if skipped else {}
        return {**ids, **pad, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
                "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
                "intermediate_size": cfg.d_ff, "hidden_act": act,
                "max_position_embeddings": cfg.max_seq_len + skipped,
                "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.norm_eps}
    if cfg.arch == "gpt2":
        return {**ids, "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len,
                "n_ctx": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layer,
                "n_head": cfg.n_head, "n_inner": cfg.d_ff, "activation_function": act,
                "layer_norm_epsilon": cfg.norm_eps}
    hf = {**ids, "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len,
          "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
          "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
          "head_dim": cfg.dim_head, "intermediate_size": cfg.d_ff, "hidden_act": act,
          "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
          "mlp_bias": cfg.ffn_bias}
    if cfg.rope_scaling:
        hf["rope_scaling"] = {"rope_type": "llama3", **cfg.rope_scaling}
    if cfg.arch == "llama":
        hf["attention_bias"] = cfg.attn_qkv_bias
    if cfg.arch == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    if cfg.arch == "qwen2":
        hf["use_sliding_window"] = cfg.sliding_window is not None
        hf["sliding_window"] = cfg.sliding_window
        hf["max_window_layers"] = 0  # the window applies to every layer, as in Pagoda
    return hf
