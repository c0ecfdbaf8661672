"""Data storey: corpora tokenized into memory-mapped token shards for training."""

from pagoda.data.shards import ShardError, ShardWriter, TokenShards, token_dtype, write_index

__all__ = ["ShardError", "ShardWriter", "TokenShards", "token_dtype", "write_index"]
