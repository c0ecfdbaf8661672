"""Per-request sampling settings and the batched sampler the engine calls every decode step.

Order of logit processing for one row (as in vLLM; HF has no presence/frequency penalties):
  raw logits -> repetition penalty -> frequency/presence penalties -> [greedy: argmax]
             -> temperature -> top-k -> top-p -> min-p -> sample (exponential race)

Reported logprobs follow OpenAI/vLLM: they come from the *raw* model distribution
(log_softmax of the unprocessed logits), so they describe the model, not the sampling settings.

A row with a constraint (`SamplingParams.constraint`, see `constrained.py`) is masked first: its
grammar's forbidden tokens get -inf, so every step above (and its logprobs, as in vLLM) sees only
the tokens that keep the output valid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pagoda.errors import InvalidRequestError

if TYPE_CHECKING:
    from pagoda.infer.constrained import Constraint, ConstraintMatcher

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
_NUCLEUS_WINDOW = 1024  # first guess at how many top tokens hold a top-p nucleus


@dataclass
class SamplingParams:
    """How one sequence picks its next token and when it ends.

    Construction does not validate, so API layers can build one from a request and map the
    error themselves: call `validate()` (raises) or `validated()` (returns self) before use.
    """

    # Softmax temperature; 0 means greedy (argmax after penalties). Allowed: >= 0.
    temperature: float = 1.0
    # Keep only the k most likely tokens; 0 turns it off. Allowed: >= 0.
    top_k: int = 0
    # Keep the smallest set of most likely tokens whose mass reaches top_p. Allowed: (0, 1].
    top_p: float = 1.0
    # Drop tokens whose probability is below min_p * (probability of the top token). [0, 1].
    min_p: float = 0.0
    # HF/CTRL style over prompt + output tokens: positive logits / p, negative logits * p.
    # 1 is off, > 1 discourages repeats. Allowed: > 0.
    repetition_penalty: float = 1.0
    # OpenAI style over generated tokens: logit -= presence_penalty once a token appeared.
    # Allowed: [-2, 2].
    presence_penalty: float = 0.0
    # OpenAI style over generated tokens: logit -= frequency_penalty * count. Allowed: [-2, 2].
    frequency_penalty: float = 0.0
    # Seed for this sequence's own generator: same seed, same tokens, whatever else is batched.
    # None draws from torch's global generator.
    seed: int | None = None
    # Most tokens to generate; None generates until the context window is full. Allowed: >= 1.
    max_tokens: int | None = None
    # Strings that end generation; the matched string is not returned. At most 16, non-empty.
    stop: list[str] = field(default_factory=list)
    # Token ids that end generation (in addition to EOS unless ignore_eos).
    stop_token_ids: list[int] = field(default_factory=list)
    # Keep generating past the model's EOS token (benchmarks, fixed-length outputs).
    ignore_eos: bool = False
    # Return the log-probability (raw model distribution) of each chosen token.
    logprobs: bool = False
    # Also return this many most likely alternatives per position; needs logprobs. [0, 20].
    top_logprobs: int = 0
    # Grammar the output must follow (JSON object / JSON schema), from `ConstraintFactory`;
    # compiled and stateless, so copies and n choices share it. The sequence ends ("stop") as
    # soon as the output is complete. Not checked by validate(). None: unconstrained.
    constraint: Constraint | None = None

    @property
    def greedy(self) -> bool:
        """Whether this row takes the argmax instead of drawing."""
        return self.temperature == 0

    @property
    def truncates(self) -> bool:
        """Whether top-k, top-p or min-p removes any candidates."""
        return self.top_k > 0 or self.top_p < 1 or self.min_p > 0

    @property
    def penalizes(self) -> bool:
        """Whether any penalty changes logits (so the sampler must look at history)."""
        return (
            self.repetition_penalty != 1
            or self.presence_penalty != 0
            or self.frequency_penalty != 0
        )

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first field outside its allowed range."""
        _check_number("temperature", self.temperature, 0, math.inf, ">= 0")
        _check_int("top_k", self.top_k, 0, None, ">= 0 (0 disables it)")
        _check_number("top_p", self.top_p, 0, 1, "in (0, 1]", low_open=True)
        _check_number("min_p", self.min_p, 0, 1, "in [0, 1]")
        _check_number(
            "repetition_penalty", self.repetition_penalty, 0, math.inf, "> 0", low_open=True
        )
        _check_number("presence_penalty", self.presence_penalty, -2, 2, "in [-2, 2]")
        _check_number("frequency_penalty", self.frequency_penalty, -2, 2, "in [-2, 2]")
        if self.seed is not None:
            _check_int("seed", self.seed, *_SEED_RANGE, "an integer in [-2^63, 2^64)")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1, None, ">= 1 (or null)")
        _check_int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS, "in [0, 20]")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError(
                f"top_logprobs={self.top_logprobs} needs logprobs=true; set logprobs or drop it"
            )
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(
                f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed"
            )
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(f"stop strings must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, 0, None, "made of token ids >= 0")

    def validated(self) -> SamplingParams:
        """Validate and return self, for `SamplingParams(...).validated()` one-liners."""
        self.validate()
        return self


def _check_number(
    name: str, value: object, low: float, high: float, allowed: str, low_open: bool = False
) -> None:
    """Raise unless value is a real number in [low, high] (or (low, high] when low_open)."""
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and not math.isnan(value)
        and (value > low if low_open else value >= low)
        and value <= high
    )
    if not ok:
        raise InvalidRequestError(f"{name} must be {allowed}, got {value!r}")


def _check_int(name: str, value: object, low: int, high: int | None, allowed: str) -> None:
    """Raise unless value is an int in [low, high] (no upper bound when high is None)."""
    ok = (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= low
        and (high is None or value <= high)
    )
    if not ok:
        raise InvalidRequestError(f"{name} must be {allowed}, got {value!r}")


class SequenceSamplingState:
    """What one sequence carries between steps: tokens seen (for penalties), its own RNG and
    where it is in its constraint's grammar.

    Create it once per sequence and call `append` with every token the sequence generates.
    """

    def __init__(
        self,
        prompt_token_ids: list[int],
        seed: int | None = None,
        constraint: Constraint | None = None,
    ) -> None:
        self.seed = seed
        self.seen: set[int] = set(prompt_token_ids)  # prompt + output, for repetition penalty
        self.output_counts: dict[int, int] = {}  # generated token id -> times generated
        self._generator: torch.Generator | None = None
        self.constraint: ConstraintMatcher | None = (
            constraint.matcher() if constraint is not None else None
        )

    @classmethod
    def for_params(
        cls, params: SamplingParams, prompt_token_ids: list[int]
    ) -> SequenceSamplingState:
        """State for a new sequence with these settings and this prompt."""
        return cls(prompt_token_ids, params.seed, params.constraint)

    def append(self, token_id: int) -> None:
        """Record a generated token so later steps can penalize it (and its grammar advances)."""
        self.seen.add(token_id)
        self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1
        if self.constraint is not None:
            self.constraint.accept(token_id)

    @property
    def constraint_done(self) -> bool:
        """Whether the constrained output is complete (nothing but EOS may follow)."""
        return self.constraint is not None and self.constraint.is_finished()

    def generator(self, device: torch.device) -> torch.Generator | None:
        """This sequence's generator, created and seeded on first use; None when unseeded."""
        if self.seed is None:
            return None
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator


@dataclass
class SampleResult:
    """The tokens picked for a batch, plus raw-distribution logprobs where requested."""

    token_ids: list[int]
    # log P(chosen token) under the raw model distribution; None where logprobs=False.
    logprobs: list[float | None]
    # Per row, the top_logprobs most likely (token id, logprob) pairs; empty when not asked.
    top_logprobs: list[list[tuple[int, float]]]


def sample(
    logits: Tensor, params: list[SamplingParams], states: list[SequenceSamplingState]
) -> SampleResult:
    """Pick one token per row of `logits` [B, V], each row with its own settings and RNG."""
    batch = logits.shape[0]
    if len(params) != batch or len(states) != batch:
        raise ValueError(f"got {batch} logit rows, {len(params)} params, {len(states)} states")
    raw = logits.float()  # [B, V]; never modified after masking, for logprobs
    constrained = [i for i, s in enumerate(states) if s.constraint is not None]
    if constrained:  # -inf on the tokens each row's grammar forbids; the caller's rows stay
        raw = raw.clone() if raw is logits else raw
        for i in constrained:
            states[i].constraint.mask_logits(raw[i])

    if all(p.greedy and not p.penalizes for p in params):
        tokens = raw.argmax(dim=-1)  # [B]
    else:
        processed = apply_penalties(raw, params, states)  # [B, V]
        tokens = _pick(processed, params, states)  # [B]
    token_ids: list[int] = tokens.tolist()
    logprobs, top = _raw_logprobs(raw, tokens, params)
    return SampleResult(token_ids, logprobs, top)


def apply_penalties(
    logits: Tensor, params: list[SamplingParams], states: list[SequenceSamplingState]
) -> Tensor:
    """Return logits [B, V] with repetition, then frequency/presence penalties applied.

    The input is left untouched (it is the raw distribution logprobs are reported from).
    """
    rep_rows, rep_toks, rep_pen = [], [], []
    freq_rows, freq_toks, freq_delta = [], [], []
    for i, (p, s) in enumerate(zip(params, states, strict=True)):
        if p.repetition_penalty != 1 and s.seen:
            rep_rows += [i] * len(s.seen)
            rep_toks += s.seen
            rep_pen += [p.repetition_penalty] * len(s.seen)
        if (p.presence_penalty or p.frequency_penalty) and s.output_counts:
            for tok, count in s.output_counts.items():
                freq_rows.append(i)
                freq_toks.append(tok)
                freq_delta.append(p.frequency_penalty * count + p.presence_penalty)
    if not rep_rows and not freq_rows:
        return logits
    out = logits.clone()
    dev = logits.device
    if rep_rows:
        idx = (torch.tensor(rep_rows, device=dev), torch.tensor(rep_toks, device=dev))
        pen = torch.tensor(rep_pen, device=dev)
        vals = out[idx]  # [N]
        out[idx] = torch.where(vals > 0, vals / pen, vals * pen)
    if freq_rows:
        idx = (torch.tensor(freq_rows, device=dev), torch.tensor(freq_toks, device=dev))
        out[idx] -= torch.tensor(freq_delta, device=dev)
    return out


def _pick(
    logits: Tensor, params: list[SamplingParams], states: list[SequenceSamplingState]
) -> Tensor:
    """Argmax [B] for greedy rows, a draw from the truncated distribution for the rest."""
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if len(drawn) == len(params):
        return _draw(logits, params, states)
    tokens = logits.argmax(dim=-1)  # [B]
    if drawn:
        rows = torch.tensor(drawn, device=logits.device)
        tokens[rows] = _draw(logits[rows], [params[i] for i in drawn], [states[i] for i in drawn])
    return tokens


def _draw(
    logits: Tensor, params: list[SamplingParams], states: list[SequenceSamplingState]
) -> Tensor:
    """Sample one token per row [R] after temperature, top-k, top-p and min-p."""
    temps = torch.tensor([p.temperature for p in params], device=logits.device)
    probs = (logits / temps[:, None]).softmax(dim=-1)  # [R, V]
    _truncate(probs, params)
    return _exponential_race(probs, states)


def _truncate(probs: Tensor, params: list[SamplingParams]) -> None:
    """Zero the probabilities [R, V] outside each row's top-k / top-p / min-p set, in place.

    No renormalization: the exponential race is indifferent to the scale of a row.
    """
    which = [j for j, p in enumerate(params) if p.truncates]
    if not which:
        return
    rows = torch.tensor(which, device=probs.device)
    sub = [params[j] for j in which]
    candidates = probs[rows]  # [T, V]
    keep = _top_k_top_p_mask(candidates, sub)  # [T, V]
    # min-p is a ratio to the top token, so renormalizing after top-k/top-p would not change it.
    min_p = torch.tensor([p.min_p for p in sub], device=probs.device)
    keep &= candidates >= min_p[:, None] * candidates.amax(dim=-1, keepdim=True)
    probs[rows] = candidates * keep


def _top_k_top_p_mask(probs: Tensor, params: list[SamplingParams]) -> Tensor:
    """Mask [T, V] of each row's top-k tokens, then of its smallest nucleus with mass >= top_p.

    Ranks only a window of the most likely tokens (topk rather than a full sort: 50k-entry
    sorts cost milliseconds per row on CPU), widening it until every nucleus fits, so the
    result is the same as sorting the whole vocabulary.
    """
    vocab = probs.shape[-1]
    dev = probs.device
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=dev)
    # top_p = 1 must keep everything even if the cumulative sum rounds past 1.
    top_p = torch.tensor([p.top_p if p.top_p < 1 else math.inf for p in params], device=dev)
    unbounded = [p.top_k == 0 and p.top_p == 1 for p in params]  # min-p only
    open_nucleus = any(p.top_k == 0 and p.top_p < 1 for p in params)  # size unknown up front
    window = min(vocab, max(p.top_k or (_NUCLEUS_WINDOW if p.top_p < 1 else 0) for p in params))
    if window == 0:
        return torch.ones_like(probs, dtype=torch.bool)
    while True:
        top, ids = probs.topk(window, dim=-1)  # [T, W], descending
        drop = torch.arange(window, device=dev)[None, :] >= top_k[:, None]  # [T, W]
        top = top.masked_fill(drop, 0)
        cum = top.cumsum(dim=-1)  # [T, W]
        # top-p applies to the renormalized top-k distribution: scale the threshold by its mass.
        k_mass = cum.gather(1, (top_k.clamp(max=window) - 1)[:, None])  # [T, 1]
        k_mass = torch.where(top_k[:, None] < vocab, k_mass, 1.0)
        threshold = top_p[:, None] * k_mass  # [T, 1]
        drop |= cum - top >= threshold  # mass before a token already reaches top_p
        if window == vocab or not open_nucleus or bool((cum[:, -1:] >= threshold).all()):
            break
        window = min(vocab, window * 8)
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, ids, ~drop)
    if any(unbounded):
        keep[torch.tensor(unbounded, device=dev)] = True
    return keep


def _exponential_race(probs: Tensor, states: list[SequenceSamplingState]) -> Tensor:
    """Draw one token per row [R] as argmax(p / Exp(1)); each seeded row uses its own noise.

    Equivalent to multinomial sampling from p (which need not sum to 1), but the only per-row
    work is filling that row's noise from its generator, so a seeded row draws the same token
    whatever it is batched with.
    """
    uniform = torch.empty_like(probs)  # [R, V]
    unseeded = [j for j, s in enumerate(states) if s.seed is None]
    if len(unseeded) == len(states):
        uniform.uniform_()
    elif unseeded:
        rows = torch.tensor(unseeded, device=probs.device)
        uniform[rows] = probs.new_empty(len(unseeded), probs.shape[-1]).uniform_()
    for j, s in enumerate(states):
        if s.seed is not None:
            uniform[j].uniform_(generator=s.generator(probs.device))
    # -log(U) is Exp(1) and cheaper than exponential_(); U = 0 gives inf, so p / inf = 0.
    noise = uniform.log_().neg_()
    return (probs / noise).argmax(dim=-1)


def _raw_logprobs(
    raw: Tensor, tokens: Tensor, params: list[SamplingParams]
) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
    """Chosen-token and top-n logprobs from log_softmax(raw logits), only for rows that ask."""
    batch = len(params)
    chosen: list[float | None] = [None] * batch
    top: list[list[tuple[int, float]]] = [[] for _ in range(batch)]
    asked = [i for i, p in enumerate(params) if p.logprobs]
    if not asked:
        return chosen, top
    rows = torch.tensor(asked, device=raw.device)
    logp = raw[rows].log_softmax(dim=-1)  # [L, V]
    chosen_lp = logp.gather(1, tokens[rows][:, None])[:, 0].tolist()  # [L]
    for i, lp in zip(asked, chosen_lp, strict=True):
        chosen[i] = lp
    n = min(max(params[i].top_logprobs for i in asked), logp.shape[-1])
    if n:
        vals, ids = logp.topk(n, dim=-1)  # [L, n], descending
        for i, row_vals, row_ids in zip(asked, vals.tolist(), ids.tolist(), strict=True):
            k = params[i].top_logprobs
            # a constrained row may allow fewer than k tokens: masked ones (-inf) are no choice
            top[i] = [
                (t, v) for t, v in zip(row_ids[:k], row_vals[:k], strict=True) if v > -math.inf
            ]
    return chosen, top
