"""Prompt scoring for /v1/completions with `echo` + `logprobs` (lm-evaluation-harness's
loglikelihood requests): the log-probability of every prompt token given the ones before it.

The engine samples new tokens and never reports prompt logprobs, so this is a prefill-only path
outside it: one plain forward of `pagoda.model.Transformer` over the prompt (no KV cache), run
on a single worker thread so the event loop stays free and scoring requests do not pile up
memory (each holds a [T, vocab] logits tensor while it runs). It shares the weights with the
engine, read-only, and runs beside the engine's own thread.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch

from pagoda.errors import ContextLengthError
from pagoda.model.transformer import Transformer


class PromptScorer:
    """Scores prompts on one background thread."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagoda-score")

    async def score(self, ids: list[int], top_n: int
                    ) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
        """Per prompt token: log P(token | tokens before) (None for the first) and its top-n."""
        context = self.model.cfg.max_seq_len
        if len(ids) > context:
            raise ContextLengthError(
                f"This model's maximum context length is {context} tokens. However, your "
                f"prompt has {len(ids)} tokens. Please reduce the length of the prompt.")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, prompt_logprobs, self.model, ids, top_n)

    def shutdown(self) -> None:
        """Stop the worker thread (pending scores are cancelled)."""
        self.pool.shutdown(wait=False, cancel_futures=True)


@torch.inference_mode()
def prompt_logprobs(model: Transformer, ids: list[int], top_n: int = 0
                    ) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
    """Log-probabilities of ids[1:] under the model, with the top_n alternatives per position."""
    if len(ids) < 2:
        return [None] * len(ids), [[] for _ in ids]
    x = torch.tensor([ids], device=model.device)  # (1, T)
    logits = model(x)[0, :-1].float()  # (T-1, vocab): position t predicts token t+1
    logp = logits.log_softmax(dim=-1)
    chosen = logp.gather(1, x[0, 1:, None])[:, 0].tolist()  # (T-1,)
    tops: list[list[tuple[int, float]]] = [[] for _ in range(len(ids) - 1)]
    if top_n:
        vals, idx = logp.topk(min(top_n, logp.shape[-1]), dim=-1)  # (T-1, n)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(idx.tolist(), vals.tolist(),
                                                             strict=True)]
    return [None, *chosen], [[], *tops]
