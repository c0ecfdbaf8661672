"""Train storey: pretraining (causal and masked LM) with exact resume, DDP and FSDP."""

from pagoda.train.config import PretrainConfig, load_config
from pagoda.train.trainer import Trainer, pretrain

__all__ = ["PretrainConfig", "Trainer", "load_config", "pretrain"]
