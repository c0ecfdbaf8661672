"""Named model configs (`ModelConfig.from_name`), with the published shapes of each family."""

from pagoda.model.config import ModelConfig


def _gpt2(name: str, d_model: int, n_layer: int, n_head: int, **kw) -> ModelConfig:
    """GPT-2 family: learned positions, pre-LayerNorm, GELU (tanh), biases, tied head."""
    base = dict(arch="gpt2", vocab_size=50257, max_seq_len=1024, pos_encoding="learned",
                norm="layernorm", activation="gelu_tanh", gated_ffn=False, attn_qkv_bias=True,
                attn_out_bias=True, ffn_bias=True, bos_token_id=50256, eos_token_id=50256)
    base.update(kw)
    return ModelConfig(name=name, d_model=d_model, n_layer=n_layer, n_head=n_head,
                       d_ff=4 * d_model, **base)


def _llama(name: str, **kw) -> ModelConfig:
    """Llama family: RoPE, pre-RMSNorm, SwiGLU, no biases."""
    return ModelConfig(name=name, arch=kw.pop("arch", "llama"), pos_encoding="rope",
                       norm="rmsnorm", activation="silu", gated_ffn=True, **kw)


def _bert(name: str, d_model: int, n_layer: int, n_head: int, d_ff: int, **kw) -> ModelConfig:
    """BERT encoder: learned positions, token types, LayerNorm on the embeddings and after each
    residual (post-norm), exact GELU, biases, bidirectional attention, hidden states out."""
    base = dict(arch="bert", vocab_size=30522, max_seq_len=512, pos_encoding="learned",
                type_vocab_size=2, embed_norm=True, norm="layernorm", norm_eps=1e-12,
                norm_position="post", final_norm=False, activation="gelu", gated_ffn=False,
                attn_qkv_bias=True, attn_out_bias=True, ffn_bias=True, tie_embeddings=False,
                lm_head=False, causal=False)
    base.update(kw)
    return ModelConfig(name=name, d_model=d_model, n_layer=n_layer, n_head=n_head, d_ff=d_ff,
                       **base)


_SMOLLM2 = dict(vocab_size=49152, max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True,
                bos_token_id=1, eos_token_id=2)

PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        # --- Llama family -----------------------------------------------------------------
        _llama("smollm2-135m", d_model=576, n_layer=30, n_head=9, n_kv_head=3, d_ff=1536,
               **_SMOLLM2),
        _llama("smollm2-360m", d_model=960, n_layer=32, n_head=15, n_kv_head=5, d_ff=2560,
               **_SMOLLM2),
        _llama("smollm2-1.7b", d_model=2048, n_layer=24, n_head=32, n_kv_head=32, d_ff=8192,
               **{**_SMOLLM2, "rope_theta": 130000.0}),
        _llama("llama3.2-1b", vocab_size=128256, max_seq_len=131072, d_model=2048, n_layer=16,
               n_head=32, n_kv_head=8, d_ff=8192, rope_theta=500000.0, tie_embeddings=True,
               rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192},
               bos_token_id=128000, eos_token_id=128009),
        _llama("llama3-8b", vocab_size=128256, max_seq_len=8192, d_model=4096, n_layer=32,
               n_head=32, n_kv_head=8, d_ff=14336, rope_theta=500000.0, tie_embeddings=False,
               bos_token_id=128000, eos_token_id=128009),
        _llama("mistral-7b", arch="mistral", vocab_size=32000, max_seq_len=32768, d_model=4096,
               n_layer=32, n_head=32, n_kv_head=8, d_ff=14336, sliding_window=4096,
               tie_embeddings=False, bos_token_id=1, eos_token_id=2),
        _llama("qwen2-0.5b", arch="qwen2", vocab_size=151936, max_seq_len=32768, d_model=896,
               n_layer=24, n_head=14, n_kv_head=2, d_ff=4864, rope_theta=1000000.0,
               norm_eps=1e-6, attn_qkv_bias=True, tie_embeddings=True,
               bos_token_id=151643, eos_token_id=151645),
        # --- GPT-2 / GPT-3 ---------------------------------------------------------------
        _gpt2("gpt2", 768, 12, 12),
        _gpt2("gpt2-medium", 1024, 24, 16),
        _gpt2("gpt2-large", 1280, 36, 20),
        _gpt2("gpt2-xl", 1600, 48, 25),
        _gpt2("gpt3-175b", 12288, 96, 96, max_seq_len=2048),
        # --- BERT encoders (sentence embedders) ----------------------------------------------
        _bert("bert-base", 768, 12, 12, 3072),
        _bert("minilm-l6", 384, 6, 12, 1536),  # all-MiniLM-L6-v2
        # multilingual-e5-small: a BERT (multilingual MiniLM) reading XLM-R's SentencePiece
        _bert("e5-small-multilingual", 384, 12, 12, 1536, vocab_size=250037),
        # --- "Attention Is All You Need" (base), as a decoder-only language model -----------
        ModelConfig(name="transformer-base", arch="gpt2", vocab_size=37000, max_seq_len=512,
                    d_model=512, n_layer=6, n_head=8, d_ff=2048, pos_encoding="sinusoidal",
                    scale_embeddings=True, norm="layernorm", norm_eps=1e-6,
                    norm_position="post", final_norm=False, activation="relu",
                    gated_ffn=False, attn_qkv_bias=True, attn_out_bias=True, ffn_bias=True,
                    dropout=0.1),
        # --- small models for experiments and tests --------------------------------------
        # nanoGPT's character-level Shakespeare "baby GPT" (bias=False: no bias anywhere).
        ModelConfig(name="baby-gpt", arch="gpt2", vocab_size=65, max_seq_len=256, d_model=384,
                    n_layer=6, n_head=6, d_ff=1536, pos_encoding="learned", norm="layernorm",
                    norm_bias=False, activation="gelu", gated_ffn=False, dropout=0.2),
        _llama("tiny-llama", vocab_size=512, max_seq_len=256, d_model=64, n_layer=2, n_head=4,
               n_kv_head=2, d_ff=128),
        _llama("tiny-moe", vocab_size=512, max_seq_len=256, d_model=64, n_layer=2, n_head=4,
               n_kv_head=2, d_ff=96, n_experts=4, n_experts_per_token=2),
    ]
}
