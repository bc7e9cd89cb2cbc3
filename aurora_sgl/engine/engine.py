"""The embedded speculative engine: continuous batching over a static KV cache, EAGLE-3 chain
drafting, one target forward to verify, draft extend on what was accepted.

One `step()`:
  1. admit waiting requests into free cache slots;
  2. prefill one chunk of every request still reading its prompt (the last chunk samples the first
     token and runs the draft head over the prompt);
  3. one speculative step for every request that is decoding: draft K tokens, verify them in one
     target forward, commit the accepted prefix plus one target token, extend the draft head's
     cache over the committed positions (this also yields the next step's first draft);
  4. retire finished requests and compact the slots so the running batch stays a contiguous range
     of cache rows (reads are then views, not gathers).
K = 0 is plain autoregressive decoding. With `adaptive`, K is chosen per step in 0..K
(engine/adaptive.py). The draft head's own work (its KV cache over committed positions) is lazy:
steps that do not draft (prefill, K = 0) queue their target states per request, and the next
drafting step catches the head up over them in one batched forward, so a step at K = 0 costs what
plain decoding costs.

Logprobs (SamplingParams.return_logprob) are read off the target's logits at each committed
position, so they are the target's whatever K and draft head: SGLang's definitions, output tokens
log_softmax(logits / temperature) (raw for greedy), prompt tokens the raw log_softmax (computed
only for requests that ask; engine/logprobs.py).

Every speculative step returns a `StepRecord` per request: what was drafted, what the target said
at each draft position, and views of the target's hidden states at the committed positions. The
online trainer's ring consumes these; the engine never waits on it.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from aurora_sgl.engine.adaptive import EXPLORE_SHARE, AdaptiveK, RequestAcceptance, StepCosts, calibrate
from aurora_sgl.engine.draft_head import Eagle3Config, Eagle3Head
from aurora_sgl.engine.grammar import GrammarCompiler, RequestGrammar
from aurora_sgl.engine.head_choice import (
    DECIDE_AFTER_TOKENS,
    FALLBACK_MARGIN,
    RECENT_CHOICES,
    SCORE_POSITIONS,
    SCORE_STEPS,
    HeadEvidence,
    choose_head,
    head_score,
    usual_head,
)
from aurora_sgl.engine.logprobs import add_input_logprobs, add_output_logprobs
from aurora_sgl.engine.penalties import controlled_logits, has_controls
from aurora_sgl.engine.sampling import SamplingParams, probs_from_logits
from aurora_sgl.engine.target import TargetModel, load_hf_causal_lm
from aurora_sgl.engine.verify import sample_with_uniform, verify_greedy, verify_sampling
from aurora_sgl.records import NO_TOKEN, Outcome, StepRecord, prompt_records

log = logging.getLogger("aurora_sgl.engine")

DEFAULT_DRAFT_VOCAB = 2048


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    state: str = "waiting"  # waiting -> prefill -> decode -> done
    slot: int = -1
    prefilled: int = 0
    finish_reason: str | None = None
    matched_stop: str | int | None = None
    text: str | None = ""  # None: decode lazily from output_ids
    verify_ct: int = 0
    drafts_proposed: int = 0
    drafts_accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)  # steps that drafted position j
    k_steps: list[int] = field(default_factory=list)  # decode steps per K chosen (adaptive)
    acceptance: RequestAcceptance | None = None  # its own draft outcomes, for adaptive K
    grammar: RequestGrammar | None = None  # structured output (regex / json_schema / ebnf)
    draft_versions: set[int] = field(default_factory=set)
    head_hidden: torch.Tensor | None = None  # head state after the last extend: next draft's input
    head_logits: torch.Tensor | None = None
    # Which head drafts it (0: the live head, i: engine.fallback_heads[i - 1]), and the evidence
    # the choice is made on until it is final (engine/head_choice.py; None: final, or one head).
    head_index: int = 0
    head_evidence: HeadEvidence | None = None
    head_switched: bool = False  # the final choice moved it to another head mid-request
    # Committed positions the draft head has not run over yet: (aux_hidden [n, 3H], the token
    # after each [n], first position), consecutive and oldest first.
    head_pending: list[tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=list)
    # Logprobs (params.return_logprob), SGLang's layout: one entry per output token (kept the
    # length of output_ids), and per prompt token from logprob_start_len on (the first is None).
    # Top entries are (values, ids) sorted by value; token-ids entries are values in the order
    # of params.token_ids_logprob.
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[tuple[list[float], list[int]]] = field(default_factory=list)
    output_token_ids_logprobs: list[list[float]] = field(default_factory=list)
    input_logprobs: list[float | None] = field(default_factory=list)
    input_top_logprobs: list[tuple[list[float], list[int]] | None] = field(default_factory=list)
    input_token_ids_logprobs: list[list[float] | None] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.state == "done"

    @property
    def last_position(self) -> int:
        """Position of the newest committed token (not yet in the target's cache)."""
        return len(self.prompt_ids) + len(self.output_ids) - 1

    @property
    def input_logprob_start(self) -> int:
        """First prompt position with an input logprob entry (len(prompt_ids): none)."""
        s = self.params.logprob_start_len
        return len(self.prompt_ids) if s < 0 or not self.params.return_logprob else s

    @property
    def input_logprob_ids(self) -> list[int]:
        """The prompt tokens the input logprob entries belong to."""
        return self.prompt_ids[self.input_logprob_start :]

    def _trim_logprobs(self) -> None:
        """Stop strings cut output_ids after commit: keep the logprob lists the same length."""
        n = len(self.output_ids)
        del self.output_logprobs[n:], self.output_top_logprobs[n:], self.output_token_ids_logprobs[n:]

    @property
    def ended_on_stop_token(self) -> bool:
        """Finished by a stop token (EOS, a stop_token_ids id, or the token that ended a grammar),
        which is the last output id: SGLang's FINISH_MATCHED_TOKEN."""
        return self.finish_reason == "stop" and isinstance(self.matched_stop, int)

    @property
    def text_ids(self) -> list[int]:
        """The output ids the text is decoded from: all but a matched stop token, which stays in
        output_ids (with its logprob, counted in completion_tokens) but not in the text, as
        SGLang's detokenizer trims it (trim_matched_stop; no_stop_trim is not offered)."""
        return self.output_ids[:-1] if self.ended_on_stop_token else self.output_ids

    @property
    def accept_length(self) -> float:
        """tau = 1 + accepted drafts per verify step (includes the bonus token)."""
        return 1.0 + self.drafts_accepted / self.verify_ct if self.verify_ct else 0.0

    def logprob_output(self) -> dict | None:
        """The logprobs asked for (None unless params.return_logprob), in SGLang's raw layout:
        values and token ids side by side, top alternatives as (values, ids) per position."""
        p = self.params
        if not p.return_logprob:
            return None
        out = {
            "input_token_logprobs": (list(self.input_logprobs), self.input_logprob_ids),
            "output_token_logprobs": (list(self.output_logprobs), list(self.output_ids)),
        }
        if p.top_logprobs_num:
            out["input_top_logprobs"] = list(self.input_top_logprobs)
            out["output_top_logprobs"] = list(self.output_top_logprobs)
        if p.token_ids_logprob is not None:
            out["input_token_ids_logprobs"] = list(self.input_token_ids_logprobs)
            out["output_token_ids_logprobs"] = list(self.output_token_ids_logprobs)
        return out

    def meta_info(self) -> dict:
        return {
            "id": self.id,
            "prompt_tokens": len(self.prompt_ids),
            "completion_tokens": len(self.output_ids),
            "finish_reason": self.finish_reason,
            "matched_stop": self.matched_stop,
            "spec_verify_ct": self.verify_ct,
            "spec_accept_length": round(self.accept_length, 4),
            "spec_accept_rate": round(self.drafts_accepted / self.drafts_proposed, 4) if self.drafts_proposed else 0.0,
            "spec_accept_per_position": [
                round(a / n, 4) if n else 0.0 for a, n in zip(self.accepted_per_position, self.drafted_per_position)
            ],
            "spec_k_steps": list(self.k_steps),
            "draft_version": max(self.draft_versions) if self.draft_versions else None,
            "spec_draft_head": "live" if self.head_index == 0 else f"fallback{self.head_index}",
        }


class PromptTooLong(ValueError):
    pass


class Engine:
    def __init__(
        self,
        model_path: str | None = None,
        *,
        draft_model_path: str | None = None,
        num_speculative_steps: int = 4,
        max_running_requests: int = 16,
        context_length: int | None = None,
        prefill_chunk_size: int = 256,
        draft_vocab_size: int | None = None,
        aux_layer_ids: Sequence[int] | None = None,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        model=None,
        tokenizer=None,
        adaptive: bool = False,
        explore_every: int = 32,
        explore_share: float = EXPLORE_SHARE,
    ):
        from transformers import AutoTokenizer

        from aurora_sgl import reference_model_path

        if not isinstance(num_speculative_steps, int) or not 0 <= num_speculative_steps <= 16:
            raise ValueError(f"num_speculative_steps must be an integer in [0, 16], got {num_speculative_steps!r}")
        if max_running_requests < 1:
            raise ValueError("max_running_requests must be >= 1")
        if prefill_chunk_size < 1:
            raise ValueError("prefill_chunk_size must be >= 1")
        model_path = model_path or reference_model_path()
        self.model_path = model_path
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path)
        hf = model if model is not None else load_hf_causal_lm(model_path, device, dtype)
        cfg = hf.config
        self.context_length = min(context_length or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.k = num_speculative_steps
        self.chunk = prefill_chunk_size
        self.max_running = max_running_requests
        cache_len = self.context_length + max(self.chunk, self.k + 1) + 1
        self.eos_ids = _eos_ids(cfg, self.tokenizer)
        self.grammars = GrammarCompiler(self.tokenizer, cfg.vocab_size, self.eos_ids)

        head = None
        if draft_model_path:
            head = Eagle3Head.load(draft_model_path, hf.get_input_embeddings(), device=device, dtype=dtype)
            aux_layer_ids = head.config.aux_layer_ids or aux_layer_ids
        self.target = TargetModel(hf, max_running_requests, cache_len, aux_layer_ids)
        if head is None:
            hcfg = Eagle3Config.for_target(cfg, draft_vocab_size or DEFAULT_DRAFT_VOCAB, self.target.aux_layer_ids)
            head = Eagle3Head(hcfg, hf.get_input_embeddings()).to(device=device, dtype=dtype)
            head.reset_parameters(seed)
        head.config.aux_layer_ids = list(self.target.aux_layer_ids)
        self.head = head.eval().requires_grad_(False)
        hc = head.config
        shape = (max_running_requests, hc.num_key_value_heads, cache_len, hc.head_dim)
        self.head_k = torch.zeros(shape, dtype=dtype, device=device)
        self.head_v = torch.zeros(shape, dtype=dtype, device=device)
        self.device = torch.device(device)
        self.draft_version = 0
        # Frozen heads a request may draft with instead of the live one (engine/head_choice.py);
        # online training keeps the head it started from here.
        self.fallback_heads: list[Eagle3Head] = []
        self.fallback_margin = FALLBACK_MARGIN
        self.recent_heads: collections.deque[int] = collections.deque(maxlen=RECENT_CHOICES)  # final choices
        # Overrides the choice when set: (request, scores of the live head then each fallback) ->
        # head index. Tests pin mixed batches with it, as k_policy pins K.
        self.head_policy: Callable[[Request, list[float]], int] | None = None

        self.waiting: list[Request] = []
        self.running: list[Request] = []  # running[i].slot == i, always
        self._seed_rng = torch.Generator().manual_seed(seed)
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards `waiting` for producers on other threads
        self.record_sink: Callable[[list[StepRecord]], None] | None = None
        # Prompt positions recorded per request: the last this many (None: all). Online training
        # sets it to what the trainer keeps, so the ring is not filled with positions it drops.
        self.record_prompt_tokens: int | None = None
        self.before_step: Callable[[Engine], None] | None = None  # e.g. the weight-store poll
        # Overrides the per-step K (0..k) when set: tests and experiments pin a schedule with it.
        self.k_policy: Callable[[list[Request]], int] | None = None
        self.adaptive: AdaptiveK | None = None
        if adaptive and self.k:
            costs = StepCosts(calibrate(self._synthetic_step, self.k, max_running_requests))
            self.adaptive = AdaptiveK(self.k, costs, explore_every, explore_share=explore_share)

    def add_fallback_head(self) -> Eagle3Head:
        """Keep a frozen copy of the head served now (weights and draft vocabulary) as a fallback:
        swaps change the live head only. It shares the target's embedding, so it costs the head's
        own weights."""
        copy = Eagle3Head(self.head.config, self.head.embed_weight)
        copy.load_serving_state(self.head.serving_state())
        copy = copy.to(device=self.device, dtype=self.head_k.dtype).eval().requires_grad_(False)
        self.fallback_heads.append(copy)
        return copy

    def draft_head(self, index: int) -> Eagle3Head:
        return self.head if index == 0 else self.fallback_heads[index - 1]

    # ---- request intake ---------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            # Chat-templated text already starts with the BOS token; don't add a second one.
            bos = self.tokenizer.bos_token
            return self.tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]
        ids = list(prompt)
        vocab = self.target.vocab_size
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids):
            raise ValueError(f"input_ids must be integers in [0, {vocab})")
        return ids

    def add_request(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> Request:
        params = params or SamplingParams()
        if any(i >= self.target.vocab_size for i in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids in [0, {self.target.vocab_size})")
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if params.logit_bias and any(i >= self.target.vocab_size for i in params.logit_bias):
            raise ValueError(f"logit_bias keys must be token ids in [0, {self.target.vocab_size})")
        if params.token_ids_logprob and any(i >= self.target.vocab_size for i in params.token_ids_logprob):
            raise ValueError(f"token_ids_logprob must be token ids in [0, {self.target.vocab_size})")
        if params.return_logprob and params.logprob_start_len > len(ids):
            raise ValueError(
                f"logprob_start_len is {params.logprob_start_len}, more than the prompt's {len(ids)} tokens"
            )
        if len(ids) >= self.context_length:
            raise PromptTooLong(
                f"the prompt has {len(ids)} tokens; this model's context length is {self.context_length}"
            )
        grammar = RequestGrammar(self.grammars.compile(params.grammar)) if params.grammar is not None else None
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._seed_rng))
        req = Request(
            id=request_id or uuid.uuid4().hex,
            prompt_ids=ids,
            params=params,
            generator=torch.Generator().manual_seed(seed),
            accepted_per_position=[0] * self.k,
            drafted_per_position=[0] * self.k,
            k_steps=[0] * (self.k + 1),
            acceptance=RequestAcceptance(self.k) if self.adaptive is not None else None,
            grammar=grammar,
        )
        with self._lock:
            self.waiting.append(req)
        return req

    def abort(self, req: Request) -> None:
        """Finish a request now (client went away); its slot is freed at the end of the next step."""
        with self._lock:
            if req in self.waiting:
                self.waiting.remove(req)
        if not req.finished:
            req.state, req.finish_reason = "done", "abort"

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[StepRecord]:
        if self.before_step is not None:
            self.before_step(self)
        self._admit()
        records: list[StepRecord] = []
        prefilling = [r for r in self.running if r.state == "prefill"]
        if prefilling:
            records = self._prefill_chunk(prefilling)
        decoding = [r for r in self.running if r.state == "decode"]
        if decoding:
            records += self._decode_step(decoding)
        self.retire_finished()
        if records and self.record_sink is not None:
            self.record_sink(records)
        return records

    def _admit(self) -> None:
        with self._lock:
            while self.waiting and len(self.running) < self.max_running:
                req = self.waiting.pop(0)
                if req.finished:
                    continue
                req.slot, req.state = len(self.running), "prefill"
                self.running.append(req)

    def retire_finished(self) -> None:
        """Drop finished requests and compact the survivors into slots 0..n-1."""
        keep = [r for r in self.running if not r.finished]
        for r in self.running:
            if r.finished:
                r.head_evidence = None  # views of step outputs: not kept past the request
        for new_slot, req in enumerate(keep):
            if req.slot != new_slot:
                length = req.last_position + 1 if req.state == "decode" else req.prefilled
                self.target.move_slot(req.slot, new_slot, length)
                self.head_k[new_slot, :, :length] = self.head_k[req.slot, :, :length]
                self.head_v[new_slot, :, :length] = self.head_v[req.slot, :, :length]
                req.slot = new_slot
        self.running = keep

    # ---- prefill ----------------------------------------------------------------------------
    def _prefill_chunk(self, reqs: list[Request]) -> list[StepRecord]:
        lens = [min(self.chunk, len(r.prompt_ids) - r.prefilled) for r in reqs]
        width = max(lens)
        b = len(reqs)
        tokens = torch.zeros(b, width, dtype=torch.long)
        positions = torch.empty(b, width, dtype=torch.long)
        for i, (r, n) in enumerate(zip(reqs, lens)):
            tokens[i, :n] = torch.tensor(r.prompt_ids[r.prefilled : r.prefilled + n])
            # Padding continues past the chunk: those cache entries are overwritten before use.
            positions[i] = torch.arange(r.prefilled, r.prefilled + width)
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        slots = torch.tensor([r.slot for r in reqs], device=self.device)
        last = torch.tensor([n - 1 for n in lens], device=self.device)
        out = self.target.forward(tokens, positions, slots, logits_rows=last)
        add_input_logprobs(reqs, lens, out.final_hidden, self.target.hf.lm_head)
        next_in = torch.zeros_like(tokens)  # draft input at t is x_{t+1}
        finishing = []
        logprob_rows = []
        starts = [r.prefilled for r in reqs]
        for i, (r, n) in enumerate(zip(reqs, lens)):
            start = r.prefilled
            r.prefilled += n
            following = r.prompt_ids[start + 1 : start + n + 1]
            if r.prefilled == len(r.prompt_ids):
                finishing.append(i)
                if r.params.max_new_tokens == 0:
                    r.state, r.finish_reason = "done", "length"
                    continue
                self._control([r], out.logits[i : i + 1, :1])
                first = self._sample_one(out.logits[i, 0], r)
                following = following + [first]
                self._commit(r, [first])
                if r.params.return_logprob:
                    logprob_rows.append((r, out.logits[i], 0))
            next_in[i, : len(following)] = torch.tensor(following, dtype=torch.long)
        add_output_logprobs(logprob_rows)
        if self.k:  # the head runs over the prompt when the request first drafts (_catch_up)
            next_in = next_in.to(self.device)
            for i, (r, n) in enumerate(zip(reqs, lens)):
                if not r.finished:
                    r.head_pending.append((out.aux_hidden[i, :n], next_in[i, :n], starts[i]))
            if self.fallback_heads:
                self._keep_prompt_evidence(reqs, lens, starts, next_in, out)
        for i in finishing:
            if not reqs[i].finished:
                reqs[i].state = "decode"
                if reqs[i].head_evidence is not None:
                    self._choose_head(reqs[i], final=False)
        if not self.k or not self.record_sink:
            return []
        return self._prefill_records(reqs, lens, starts, tokens, next_in, out)

    def _keep_prompt_evidence(self, reqs, lens, starts, next_in, out) -> None:
        """Every prompt row as context; the prompt's last SCORE_POSITIONS rows also to score, with
        the target's greedy token at each (one lm_head over those rows only)."""
        for i, (r, n) in enumerate(zip(reqs, lens)):
            if r.finished:
                continue
            if starts[i] == 0:
                r.head_evidence = HeadEvidence()
            first = min(n, max(0, len(r.prompt_ids) - SCORE_POSITIONS - starts[i]))
            if first:
                r.head_evidence.add(out.aux_hidden[i, :first], next_in[i, :first], starts[i], None)
            if first < n:
                greedy = self.target.hf.lm_head(out.final_hidden[i, first:n]).argmax(-1)
                r.head_evidence.add(out.aux_hidden[i, first:n], next_in[i, first:n], starts[i] + first, greedy)

    def _keep_decode_evidence(self, r: Request, aux: torch.Tensor, following: torch.Tensor, start: int) -> None:
        """Committed rows (the target's token after each is the one committed); the choice becomes
        final once DECIDE_AFTER_TOKENS tokens are out."""
        r.head_evidence.add(aux, following, start, following)
        if not r.finished and len(r.output_ids) >= DECIDE_AFTER_TOKENS:
            self._choose_head(r, final=True)

    def _choose_head(self, r: Request, final: bool) -> None:
        """Score every head (the prompt's end at prefill, the generated rows at the final choice)
        and pick the request's drafter (head_choice.py). A head taking over runs over the whole
        context at the next drafting step (_catch_up)."""
        # Row len(prompt) - 1 is the first whose draft is of a generated token (it follows the first).
        rows = r.head_evidence.score_rows(first_start=len(r.prompt_ids) - 1 if final else None)
        heads = [self.head, *self.fallback_heads]
        scores = [head_score(h, *rows, SCORE_STEPS) for h in heads]
        if self.head_policy is not None:
            index = int(self.head_policy(r, scores))
            if not 0 <= index <= len(self.fallback_heads):
                raise ValueError(f"head_policy chose {index}, outside [0, {len(self.fallback_heads)}]")
        else:
            incumbent = r.head_index if final else usual_head(self.recent_heads)
            index = choose_head(scores, self.fallback_margin, incumbent=incumbent)
        if final:
            self.recent_heads.append(index)
            if index != r.head_index:
                r.head_pending = list(r.head_evidence.context)
                r.head_hidden = r.head_logits = None
                r.head_switched = True
                if r.acceptance is not None:  # its outcomes so far were the other head's
                    r.acceptance = RequestAcceptance(self.k)
            r.head_evidence = None
        r.head_index = index

    def _prefill_records(self, reqs, lens, starts, tokens, next_in, out) -> list[StepRecord]:
        """The prompt's positions, cut into record-sized pieces: the trainer needs the context the
        head attends to when it drafts, not only the generated positions."""
        records = []
        for i, (r, n) in enumerate(zip(reqs, lens)):
            if r.finished and (
                not r.output_ids or (len(r.output_ids) == 1 and self._is_stop_token(r, r.output_ids[0]))
            ):
                continue  # max_new_tokens == 0 or EOS first: no continuation to learn from
            first = 0
            if self.record_prompt_tokens is not None:
                first = max(0, len(r.prompt_ids) - self.record_prompt_tokens - starts[i])
            records += prompt_records(
                r.id,
                starts[i],
                self.k,
                tokens[i, :n],
                next_in[i, :n],
                out.aux_hidden[i, :n],
                out.final_hidden[i, :n],
                self.draft_version,
                first=first,
            )
        return records

    def _sample_one(self, logits: torch.Tensor, r: Request) -> int:
        p = r.params
        if p.greedy:
            return int(logits.argmax())
        probs = probs_from_logits(
            logits.unsqueeze(0), torch.tensor([p.temperature]), torch.tensor([p.top_p]), torch.tensor([p.top_k])
        )
        return int(sample_with_uniform(probs, torch.rand(1, generator=r.generator))[0])

    # ---- decode -----------------------------------------------------------------------------
    def _choose_k(self, reqs: list[Request]) -> int:
        if self.k_policy is not None:
            k = int(self.k_policy(reqs))
            if not 0 <= k <= self.k:
                raise ValueError(f"k_policy chose {k}, outside [0, {self.k}]")
            return k
        if self.adaptive is None:
            return self.k
        # At T > 0 the text a seed gives depends on the K of every step; a choice made from timings
        # would make the same seed give different text. A seeded sampling request pins K instead.
        seeded = any(r.params.seed is not None and not r.params.greedy for r in reqs)
        return self.adaptive.choose(
            len(reqs), self.draft_version, pinned=self.k if seeded else None, requests=[r.acceptance for r in reqs]
        )

    def _decode_step(self, reqs: list[Request]) -> list[StepRecord]:
        k = self._choose_k(reqs)
        for r in reqs:
            r.k_steps[k] += 1
        t0 = time.perf_counter()
        if k == 0:
            records = self._decode_plain(reqs)
        else:
            # The head's deferred work (new prompts, positions committed at K = 0) is timed with
            # the step that needs it: it is what drafting costs over not drafting, and at high
            # concurrency, with requests joining every few steps, it decides whether drafting pays.
            self._catch_up(reqs)
            records = self._decode(reqs, k)
        if self.adaptive is not None:
            accepted = [r.num_accepted for r in records] if k else []
            self.adaptive.observe(
                len(reqs), k, time.perf_counter() - t0, accepted, requests=[r.acceptance for r in reqs]
            )
        return records

    def _catch_up(self, reqs: list[Request]) -> None:
        """Run the draft head over every request's pending positions (in windows of at most one
        prefill chunk), leaving its state after the newest committed token ready to draft from."""
        todo = []
        for r in reqs:
            if r.head_pending:
                aux, tok, start = zip(*r.head_pending)
                todo.append((r, torch.cat(aux), torch.cat(tok), start[0]))
                r.head_pending = []
        by_head: dict[int, list] = {}
        for entry in todo:
            by_head.setdefault(entry[0].head_index, []).append(entry)
        for index, entries in by_head.items():
            self._catch_up_with(self.draft_head(index), entries)

    def _catch_up_with(self, head: Eagle3Head, todo: list) -> None:
        done = 0
        while todo:
            width = min(self.chunk, max(a.shape[0] - done for _, a, _, _ in todo))
            b = len(todo)
            aux = todo[0][1].new_zeros(b, width, todo[0][1].shape[-1])
            tokens = torch.zeros(b, width, dtype=torch.long, device=self.device)
            positions = torch.empty(b, width, dtype=torch.long)
            lens = []
            for i, (_, a, t, start) in enumerate(todo):
                n = min(width, a.shape[0] - done)
                aux[i, :n], tokens[i, :n] = a[done : done + n], t[done : done + n]
                # Padding continues past the pending positions: drafting overwrites those entries.
                positions[i] = torch.arange(start + done, start + done + width)
                lens.append(n)
            slots = torch.tensor([r.slot for r, _, _, _ in todo], device=self.device)
            hidden = head.forward_cached(aux, tokens, positions.to(self.device), self.head_k, self.head_v, slots)
            left = []
            for i, (entry, n) in enumerate(zip(todo, lens)):
                if entry[1].shape[0] - done > n:
                    left.append(entry)
                else:
                    r = entry[0]
                    r.head_hidden = hidden[i, n - 1]
                    r.head_logits = head.logits(r.head_hidden)
            todo, done = left, done + width

    def _synthetic_step(self, b: int, k: int) -> None:
        """A decode step's forwards at batch b and K = k on cache rows 0..b-1, for the adaptive
        cost calibration at startup (no request holds a slot yet)."""
        dev = self.device
        slots = torch.arange(b, device=dev)
        srange = (0, b)
        start = max(0, min(128, self.context_length - 2 * (self.k + 2)))
        positions = start + torch.arange(k + 1, device=dev).expand(b, k + 1)
        tokens = torch.ones(b, k + 1, dtype=torch.long, device=dev)
        if k:
            hc = self.head.config
            hidden = torch.zeros(b, 1, hc.hidden_size, dtype=self.head_k.dtype, device=dev)
            for j in range(k):
                hidden = self.head.forward_cached(
                    hidden, tokens[:, :1], positions[:, j : j + 1], self.head_k, self.head_v, slots, srange
                )
                self.head.logits(hidden[:, 0]).argmax(-1).tolist()
        out = self.target.forward(tokens, positions, slots, srange)
        out.logits.argmax(-1).tolist()
        if k:
            ext = self.head.forward_cached(out.aux_hidden, tokens, positions, self.head_k, self.head_v, slots, srange)
            self.head.logits(ext[:, 0]).tolist()

    # ---- the drafting heads of a batch ------------------------------------------------------
    def _head_groups(self, reqs: list[Request]) -> list[tuple[Eagle3Head, torch.Tensor | None]]:
        """[(head, the batch rows it drafts)]; rows None: one head drafts the whole batch."""
        rows: dict[int, list[int]] = {}
        for i, r in enumerate(reqs):
            rows.setdefault(r.head_index, []).append(i)
        if len(rows) == 1:
            return [(self.draft_head(next(iter(rows))), None)]
        return [(self.draft_head(h), torch.tensor(ix, device=self.device)) for h, ix in sorted(rows.items())]

    def _heads_forward(self, groups, hidden, tokens, positions, slots, srange) -> torch.Tensor:
        if groups[0][1] is None:
            return groups[0][0].forward_cached(hidden, tokens, positions, self.head_k, self.head_v, slots, srange)
        out = None
        for head, rows in groups:
            h = head.forward_cached(hidden[rows], tokens[rows], positions[rows], self.head_k, self.head_v, slots[rows])
            out = h.new_empty((hidden.shape[0], *h.shape[1:])) if out is None else out
            out[rows] = h
        return out

    def _heads_logits(self, groups, hidden: torch.Tensor) -> torch.Tensor:
        if groups[0][1] is None:
            return groups[0][0].logits(hidden)
        out = None
        for head, rows in groups:
            logits = head.logits(hidden[rows])
            out = logits.new_empty((hidden.shape[0], logits.shape[-1])) if out is None else out
            out[rows] = logits
        return out

    def _heads_hot_ids(self, groups, b: int) -> torch.Tensor:
        """[B, draft vocab]: the target id of each row's draft-vocabulary entries."""
        if groups[0][1] is None:
            return groups[0][0].hot_ids.expand(b, -1)
        out = torch.empty(b, self.head.config.draft_vocab_size, dtype=torch.long, device=self.device)
        for head, rows in groups:
            out[rows] = head.hot_ids
        return out

    def _batch_tensors(self, reqs: list[Request]):
        slots = torch.tensor([r.slot for r in reqs], device=self.device)
        first = reqs[0].slot
        contiguous = all(r.slot == first + i for i, r in enumerate(reqs))
        return slots, ((first, first + len(reqs)) if contiguous else None)

    def _param_tensors(self, reqs: list[Request]):
        temp = torch.tensor([r.params.temperature or 1.0 for r in reqs], device=self.device)
        top_p = torch.tensor([r.params.top_p for r in reqs], device=self.device)
        top_k = torch.tensor([r.params.top_k for r in reqs], device=self.device)
        return temp, top_p, top_k

    def _decode_plain(self, reqs: list[Request]) -> list[StepRecord]:
        """One target token per request, no drafts. With a draft head (adaptive K = 0) the step's
        target states are queued for the head and recorded for the trainer (the `kl` objective
        needs no drafts), so learning goes on while speculation pauses."""
        slots, srange = self._batch_tensors(reqs)
        pos = torch.tensor([[r.last_position] for r in reqs], device=self.device)
        tok = torch.tensor([[r.output_ids[-1]] for r in reqs], device=self.device)
        out = self.target.forward(tok, pos, slots, srange)
        self._control(reqs, out.logits)
        if all(r.params.greedy for r in reqs):
            nxt = out.logits[:, 0].argmax(-1)
            nxt_l = nxt.tolist()
        else:
            nxt_l = [self._sample_one(out.logits[i, 0], r) for i, r in enumerate(reqs)]
            nxt = torch.tensor(nxt_l, device=self.device)
        positions = [r.last_position for r in reqs]
        before = [len(r.output_ids) for r in reqs]
        committed = [self._commit(r, [t]) for r, t in zip(reqs, nxt_l)]
        add_output_logprobs([(r, out.logits[i], before[i]) for i, r in enumerate(reqs) if r.params.return_logprob])
        if not self.k:
            return []
        nxt = nxt.unsqueeze(1)
        for i, r in enumerate(reqs):
            r.head_pending.append((out.aux_hidden[i, :1], nxt[i], positions[i]))
            if r.head_evidence is not None:
                self._keep_decode_evidence(r, out.aux_hidden[i, :1], nxt[i], positions[i])
        if self.record_sink is None:
            return []
        none = torch.full((self.k,), NO_TOKEN, dtype=torch.long, device=self.device)
        unreached = torch.full((self.k,), Outcome.NOT_REACHED, dtype=torch.int8, device=self.device)
        return [
            StepRecord(
                request_id=r.id,
                position=positions[i],
                draft_tokens=none,
                target_tokens=none,
                outcome=unreached,
                num_accepted=0,
                committed=committed[i],
                input_tokens=tok[i],
                next_tokens=nxt[i],
                aux_hidden=out.aux_hidden[i, :1],
                final_hidden=out.final_hidden[i, :1],
                draft_version=self.draft_version,
                num_drafted=0,
            )
            for i, r in enumerate(reqs)
        ]

    def _decode(self, reqs: list[Request], k: int) -> list[StepRecord]:
        b, dev = len(reqs), self.device
        slots, srange = self._batch_tensors(reqs)
        n = torch.tensor([r.last_position for r in reqs], device=dev)
        greedy = torch.tensor([r.params.greedy for r in reqs], device=dev)
        all_greedy = bool(greedy.all())
        temp, top_p, top_k = self._param_tensors(reqs)
        groups = self._head_groups(reqs)
        hot = self._heads_hot_ids(groups, b)
        vocab = self.target.vocab_size

        # Draft: chain of K tokens, each step feeding the head its own hidden state.
        hidden = torch.stack([r.head_hidden for r in reqs])
        logits = torch.stack([r.head_logits for r in reqs])
        drafts, draft_probs = [], []
        for j in range(k):
            if j:
                hidden = self._heads_forward(
                    groups, hidden.unsqueeze(1), drafts[-1].unsqueeze(1), (n + j - 1).unsqueeze(1), slots, srange
                )[:, 0]
                logits = self._heads_logits(groups, hidden)
            choice = logits.argmax(-1)
            if not all_greedy:
                q = probs_from_logits(logits, temp, top_p, top_k)
                u = torch.stack([torch.rand((), generator=r.generator) for r in reqs]).to(dev)
                choice = torch.where(greedy, choice, sample_with_uniform(q, u))
                # Garbage weights (NaN) give a garbage q. Any proposal is exact as long as the
                # verifier knows its distribution, so call such a draft what it was: deterministic.
                broken = ~torch.isfinite(q).all(-1)
                if bool(broken.any()):
                    q[broken] = torch.nn.functional.one_hot(choice[broken], q.shape[-1]).to(q.dtype)
                draft_probs.append(torch.zeros(b, vocab, device=dev).scatter_(1, hot, q))
            drafts.append(hot.gather(1, choice.unsqueeze(1))[:, 0])
        d = torch.stack(drafts, dim=1)  # [B, K]

        # Verify: x_n, d_1..d_K at positions n..n+K in one target forward.
        last_tok = torch.tensor([r.output_ids[-1] for r in reqs], device=dev)
        tokens = torch.cat([last_tok.unsqueeze(1), d], dim=1)
        positions = n.unsqueeze(1) + torch.arange(k + 1, device=dev)
        out = self.target.forward(tokens, positions, slots, srange)
        self._control(reqs, out.logits, d)
        accepted, next_tok = verify_greedy(d, out.logits)
        target_tok = out.logits.argmax(-1)[:, :k]
        if not all_greedy:
            p = probs_from_logits(
                out.logits.reshape(b * (k + 1), vocab),
                temp.repeat_interleave(k + 1),
                top_p.repeat_interleave(k + 1),
                top_k.repeat_interleave(k + 1),
            ).view(b, k + 1, vocab)
            u_acc = torch.stack([torch.rand(k, generator=r.generator) for r in reqs]).to(dev)
            u_next = torch.stack([torch.rand((), generator=r.generator) for r in reqs]).to(dev)
            s_acc, s_next = verify_sampling(d, torch.stack(draft_probs, dim=1), p, u_acc, u_next)
            accepted = torch.where(greedy, accepted, s_acc)
            next_tok = torch.where(greedy, next_tok, s_next)
            # At T > 0 the target's token at a draft position is the one it committed there.
            committed_at = torch.where(
                torch.arange(k, device=dev) < accepted.unsqueeze(1), d, next_tok.unsqueeze(1).expand(b, k)
            )
            target_tok = torch.where(greedy.unsqueeze(1), target_tok, committed_at)

        # Draft extend over committed positions n..n+a: input (aux_t, x_{t+1}).
        idx = torch.arange(k + 1, device=dev).unsqueeze(0)
        a = accepted.unsqueeze(1)
        ext_tokens = torch.where(idx < a, torch.cat([d, d[:, :1]], dim=1), next_tok.unsqueeze(1))
        ext_hidden = self._heads_forward(groups, out.aux_hidden, ext_tokens, positions, slots, srange)
        rows = torch.arange(b, device=dev)
        new_hidden = ext_hidden[rows, accepted]
        new_logits = self._heads_logits(groups, new_hidden)

        accepted_l, d_l, next_l = accepted.tolist(), d.tolist(), next_tok.tolist()
        outcome = torch.where(
            idx[:, :k] < a, Outcome.ACCEPTED, torch.where(idx[:, :k] == a, Outcome.REJECTED, Outcome.NOT_REACHED)
        ).to(torch.int8)
        target_tok = torch.where(outcome == Outcome.NOT_REACHED, -1, target_tok)
        if k < self.k:  # records always carry the engine's K positions (the ring's layout)
            pad = self.k - k
            d = torch.cat([d, d.new_full((b, pad), NO_TOKEN)], dim=1)
            target_tok = torch.cat([target_tok, target_tok.new_full((b, pad), NO_TOKEN)], dim=1)
            outcome = torch.cat([outcome, outcome.new_full((b, pad), Outcome.NOT_REACHED)], dim=1)
        records = []
        before = [len(r.output_ids) for r in reqs]
        for i, r in enumerate(reqs):
            acc = accepted_l[i]
            r.verify_ct += 1
            r.drafts_proposed += k
            r.drafts_accepted += acc
            for j in range(acc):
                r.accepted_per_position[j] += 1
            for j in range(k):
                r.drafted_per_position[j] += 1
            r.draft_versions.add(self.draft_version)
            committed = self._commit(r, d_l[i][:acc] + [next_l[i]])
            r.head_hidden, r.head_logits = new_hidden[i], new_logits[i]
            drafted_by = r.head_index  # before the final choice may hand the request to another head
            if r.head_evidence is not None:
                self._keep_decode_evidence(r, out.aux_hidden[i, : acc + 1], ext_tokens[i, : acc + 1], int(n[i]))
            records.append(
                StepRecord(
                    request_id=r.id,
                    position=int(n[i]),
                    draft_tokens=d[i],
                    target_tokens=target_tok[i],
                    outcome=outcome[i],
                    num_accepted=acc,
                    committed=committed,
                    input_tokens=tokens[i, : acc + 1],
                    next_tokens=ext_tokens[i, : acc + 1],
                    aux_hidden=out.aux_hidden[i, : acc + 1],
                    final_hidden=out.final_hidden[i, : acc + 1],
                    draft_version=self.draft_version,
                    num_drafted=k,
                    draft_head=drafted_by,
                )
            )
        # Committed token j of this step (d_1..d_a, then the target's) sits at verify row j.
        add_output_logprobs([(r, out.logits[i], before[i]) for i, r in enumerate(reqs) if r.params.return_logprob])
        return records

    def _control(self, reqs: list[Request], logits: torch.Tensor, drafts: torch.Tensor | None = None) -> None:
        """Apply each request's sampling controls (penalties, min tokens, grammar mask, logit bias)
        to its rows of the target's logits [B, L, V] in place; row j continues its output plus
        drafts[i, :j] (engine/penalties.py, engine/grammar.py)."""
        todo = [i for i, r in enumerate(reqs) if r.grammar is not None or has_controls(r.params)]
        if not todo:
            return
        drafts_l = drafts.tolist() if drafts is not None else None
        for i in todo:
            r = reqs[i]
            mine = drafts_l[i] if drafts_l else []
            allowed = None
            if r.grammar is not None:
                allowed = r.grammar.allowed_rows(mine, logits.shape[1]).to(logits.device)
            stop_ids = self.eos_ids | set(r.params.stop_token_ids)
            controlled = controlled_logits(logits[i], r.params, r.output_ids, mine, stop_ids, allowed)
            logits[i] = controlled.to(logits.dtype)

    # ---- commit and stop conditions ---------------------------------------------------------
    def _is_stop_token(self, r: Request, tok: int) -> bool:
        return (tok in self.eos_ids and not r.params.ignore_eos) or tok in r.params.stop_token_ids

    def _commit(self, r: Request, new_tokens: list[int]) -> list[int]:
        """Append tokens until the request finishes; returns what was appended. SGLang 0.5.23's
        order (Req.update_finish_state): a token is appended, then checked, so the EOS or a matched
        stop_token_ids id is the last output id -- with its logprob, counted in completion_tokens,
        left out of the text (Request.text_ids) -- and a stop token beats the length limit the same
        token reaches; the grammar's end comes after the length limit. Nothing after the finishing
        token is appended (a verify step can accept drafts past it), and it is never fed back."""
        p = r.params
        appended = []
        for tok in new_tokens:
            stop_tok = self._is_stop_token(r, tok)
            if r.grammar is not None and not r.grammar.accept(tok) and not stop_tok:
                # Every committed token was allowed by its row's mask: only a bug between masks
                # and matcher gets here. A stop token ends the request whatever the grammar says
                # (SGLang checks the finish before it advances the grammar).
                log.error("request %s: the grammar refused a committed token; ending the request", r.id)
                r.state, r.finish_reason = "done", "abort"
                break
            r.output_ids.append(tok)
            appended.append(tok)
            if stop_tok:
                r.state, r.finish_reason, r.matched_stop = "done", "stop", tok
                break
            if len(r.output_ids) >= p.max_new_tokens or r.last_position + 1 >= self.context_length:
                r.state, r.finish_reason = "done", "length"
                break
            if r.grammar is not None and r.grammar.terminated:  # the stop token, kept by ignore_eos
                r.state, r.finish_reason, r.matched_stop = "done", "stop", tok
                break
        if p.stop and appended:
            self._check_stop_strings(r, len(appended))
        elif appended or r.finished:
            r.text = None  # decoded lazily
        return appended

    def _check_stop_strings(self, r: Request, n_new: int) -> None:
        """SGLang's order: a stop string in the new text beats a stop token committed in the same
        step (the token's own text counts, as SGLang decodes it with the tail)."""
        text = self.tokenizer.decode(r.output_ids, skip_special_tokens=True)
        hits = [(text.find(s), s) for s in r.params.stop if s in text]
        if not hits:
            r.text = None if r.ended_on_stop_token else text
            return
        cut, s = min(hits)
        # Keep the fewest tokens whose text reaches the stop string; the text ends before it.
        keep = len(r.output_ids) - n_new + 1
        while keep < len(r.output_ids) and s not in self.tokenizer.decode(
            r.output_ids[:keep], skip_special_tokens=True
        ):
            keep += 1
        del r.output_ids[keep:]
        r._trim_logprobs()
        r.text = text[:cut]
        r.state, r.finish_reason, r.matched_stop = "done", "stop", s

    def output_text(self, r: Request) -> str:
        if r.text is None or not r.params.stop:
            r.text = self.tokenizer.decode(r.text_ids, skip_special_tokens=True)
        return r.text

    # ---- blocking and streaming APIs --------------------------------------------------------
    def run_until_done(self, reqs: Sequence[Request]) -> None:
        while not all(r.finished for r in reqs):
            self.step()

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[dict]:
        """Blocking generation; a single prompt (str or token list) or a list of them. Returns one
        dict per prompt: text, output_ids, meta_info."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        plist = [prompts] if single else list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(plist)
        reqs = [self.add_request(p, sp) for p, sp in zip(plist, params)]
        self.run_until_done(reqs)
        outs = []
        for r in reqs:
            out = {"text": self.output_text(r), "output_ids": list(r.output_ids), "meta_info": r.meta_info()}
            if r.params.return_logprob:
                out["logprobs"] = r.logprob_output()
            outs.append(out)
        return outs

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[dict]:
        """Yield {"token_ids": new ids, "text": cumulative text, "finished", "meta_info"} as tokens
        are committed; other requests in the engine advance too."""
        req = self.add_request(prompt, params)
        sent = 0
        while True:
            if not req.finished:
                self.step()
            if len(req.output_ids) > sent or req.finished:
                new = req.output_ids[sent:]
                sent = len(req.output_ids)
                update = {
                    "token_ids": new,
                    "text": self.output_text(req),
                    "finished": req.finished,
                    "meta_info": req.meta_info(),
                }
                if req.params.return_logprob:
                    update["logprobs"] = req.logprob_output()  # cumulative
                yield update
            if req.finished:
                return


def _eos_ids(config, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(src)
    return ids
