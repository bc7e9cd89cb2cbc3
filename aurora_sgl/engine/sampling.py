"""Sampling parameters (validated on construction) and the logits -> probabilities transform.

The same transform is applied to the draft's and the target's logits, so rejection sampling
verifies against exactly the distribution a target-only decoder would sample from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from aurora_sgl.engine.grammar import GRAMMAR_KINDS, GrammarSpec

MAX_STOP_STRINGS = 64
MAX_STOP_LEN = 512
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on alternatives per position
MAX_TOKEN_IDS_LOGPROB = 64
MAX_LOGIT_BIAS = 300  # OpenAI's limit on biased tokens per request
MAX_GRAMMAR_CHARS = 1 << 16
# Temperatures below this sample greedily (SGLang's rule too): dividing float32 logits by a
# temperature like 1e-300 overflows to inf and the softmax to NaN.
GREEDY_BELOW_TEMPERATURE = 1e-6


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. top_k <= 0 disables top-k (SGLang uses -1).

    The logprob options ride along (they change what is returned, never what is sampled):
    `return_logprob` turns them on; `top_logprobs_num` alternatives per position; `token_ids_logprob`
    the logprobs of these ids at every position; `logprob_start_len` the first prompt position
    that gets an input logprob (-1: none; SGLang's meaning)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    seed: int | None = None
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    token_ids_logprob: tuple[int, ...] | None = None
    # Controls over the generated text (engine/penalties.py, SGLang's definitions and ranges).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    logit_bias: dict[int, float] | None = field(default=None, hash=False)
    # Structured output (engine/grammar.py): at most one of these.
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None

    def __post_init__(self):
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}")
        if not _is_num(self.temperature) or not math.isfinite(self.temperature) or not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be a finite number in [0, 100], got {self.temperature!r}")
        if self.temperature < GREEDY_BELOW_TEMPERATURE:
            object.__setattr__(self, "temperature", 0.0)
        if not _is_num(self.top_p) or not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (-1 or 0 disables it), got {self.top_k!r}")
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise ValueError("stop must be a string or a list of strings")
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stop)}")
        if any(not s or len(s) > MAX_STOP_LEN for s in stop):
            raise ValueError(f"stop strings must be non-empty and at most {MAX_STOP_LEN} characters")
        object.__setattr__(self, "stop", tuple(stop))
        ids = self.stop_token_ids or ()
        if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
            raise ValueError("stop_token_ids must be a list of non-negative integers")
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed, got {len(ids)}")
        object.__setattr__(self, "stop_token_ids", tuple(ids))
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        self._check_logprob_options()
        self._check_controls()
        self._check_grammar()

    def _check_grammar(self) -> None:
        given = [k for k in GRAMMAR_KINDS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"at most one of regex, json_schema and ebnf may be given, got {', '.join(given)}")
        for k in given:
            v = getattr(self, k)
            if not isinstance(v, str) or not v or len(v) > MAX_GRAMMAR_CHARS:
                raise ValueError(f"{k} must be a non-empty string of at most {MAX_GRAMMAR_CHARS} characters")

    @property
    def grammar(self) -> GrammarSpec | None:
        for k in GRAMMAR_KINDS:
            if getattr(self, k) is not None:
                return GrammarSpec(k, getattr(self, k))
        return None

    def _check_controls(self) -> None:
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not _is_num(v) or not -2 <= v <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2], got {v!r}")
        r = self.repetition_penalty
        if not _is_num(r) or not 0 < r <= 2:
            raise ValueError(f"repetition_penalty must be a number in (0, 2], got {r!r}")
        m = self.min_new_tokens
        if not _is_int(m) or not 0 <= m <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be an integer in [0, max_new_tokens={self.max_new_tokens}], got {m!r}"
            )
        bias = self.logit_bias
        if bias is None or bias == {}:
            object.__setattr__(self, "logit_bias", None)
            return
        if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias must be an object of at most {MAX_LOGIT_BIAS} token ids -> bias")
        clean = {}
        for key, value in bias.items():
            tok = int(key) if isinstance(key, str) and key.isdigit() else key
            if not _is_int(tok) or tok < 0:
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {key!r}")
            if not _is_num(value) or not -100 <= value <= 100:
                raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {value!r} for {key!r}")
            clean[tok] = float(value)
        object.__setattr__(self, "logit_bias", clean)

    def _check_logprob_options(self) -> None:
        if not isinstance(self.return_logprob, bool):
            raise ValueError(f"return_logprob must be a boolean, got {self.return_logprob!r}")
        n = self.top_logprobs_num
        if not _is_int(n) or not 0 <= n <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs_num must be an integer in [0, {MAX_TOP_LOGPROBS}], got {n!r}")
        if not _is_int(self.logprob_start_len) or self.logprob_start_len < -1:
            raise ValueError(f"logprob_start_len must be an integer >= -1, got {self.logprob_start_len!r}")
        ids = self.token_ids_logprob
        if ids is not None:
            if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
                raise ValueError("token_ids_logprob must be a list of non-negative integers")
            if len(ids) > MAX_TOKEN_IDS_LOGPROB:
                raise ValueError(f"at most {MAX_TOKEN_IDS_LOGPROB} token_ids_logprob are allowed, got {len(ids)}")
            object.__setattr__(self, "token_ids_logprob", tuple(ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def logprob_temperature(self) -> float:
        """What output logprobs divide the logits by: the temperature, 1 for greedy (SGLang's)."""
        return self.temperature or 1.0


def probs_from_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor
) -> torch.Tensor:
    """Rows of logits [N, V] -> probabilities, each row with its own temperature (> 0), top-p and
    top-k (<= 0: off). Filtering keeps the smallest prefix of the sorted distribution whose mass
    reaches top_p (at least one token)."""
    logits = logits.float() / temperature.unsqueeze(-1)
    need_filter = bool((top_p < 1).any()) or bool((top_k > 0).any())
    if not need_filter:
        return torch.softmax(logits, dim=-1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(-1)
    drop = ranks >= k
    sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    drop |= mass_before >= top_p.unsqueeze(-1)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    filtered = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.softmax(filtered, dim=-1)
