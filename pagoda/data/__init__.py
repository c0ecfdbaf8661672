"""Data storey: raw documents into clean training text (`pagoda.data.pipeline`, the stages in
their own modules) and corpora into memory-mapped token shards for training."""

from pagoda.data.shards import ShardError, ShardWriter, TokenShards, token_dtype, write_index

__all__ = ["ShardError", "ShardWriter", "TokenShards", "token_dtype", "write_index"]
