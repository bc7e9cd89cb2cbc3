"""Structured output under speculation: xgrammar token masks on the target's verify rows.

A request constrained by a regex, a JSON schema or an EBNF grammar holds a `GrammarMatcher` over
its committed output. For a verify step with drafts d_1..d_K, row j of the target's logits
continues the output plus d_1..d_j, so its mask is the matcher's after accepting those drafts:
the matcher is advanced over the drafts (stopping at the first the grammar refuses: that draft is
masked out of the row before it, so verification rejects it and no later row is ever used),
each row's mask is read, and the matcher is rolled back to the committed output. After the step it
accepts what was committed. Masking the target's rows is all exactness needs: greedy output then
equals K = 0 constrained decoding and rejection sampling draws from the masked distribution; the
draft head proposes unconstrained (a proposal outside the grammar only costs its acceptance).

The failure modes seen in other servers are the tests' cases (tests/test_grammar.py): a draft that
leaves the grammar mid-block, a rejection right after a grammar state change, and a grammar that
ends (accepts the stop token) inside a draft block.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import torch

GRAMMAR_KINDS = ("regex", "json_schema", "ebnf")
_CACHE_SIZE = 64


@dataclass(frozen=True)
class GrammarSpec:
    kind: str  # one of GRAMMAR_KINDS
    source: str


class GrammarCompiler:
    """Compiles grammars against one tokenizer (lazily: xgrammar's tokenizer analysis costs a
    second or so and most servers never see a constrained request), with a small cache."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: set[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = sorted(stop_ids)
        self._compiler = None
        self._cache: dict[GrammarSpec, object] = {}
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec):
        """The compiled grammar; ValueError (the caller's input) for a grammar that does not parse."""
        import xgrammar as xgr

        with self._lock:
            if spec in self._cache:
                return self._cache[spec]
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_ids
                )
                self._compiler = xgr.GrammarCompiler(info)
            try:
                if spec.kind == "regex":
                    compiled = self._compiler.compile_regex(spec.source)
                elif spec.kind == "json_schema":
                    json.loads(spec.source)  # a clear message for text that is not JSON at all
                    # Compact separators: with free whitespace between tokens a model can pad
                    # forever ("{\n\n\n..."), which small models do (SGLang's
                    # --constrained-json-disable-any-whitespace).
                    compiled = self._compiler.compile_json_schema(spec.source, any_whitespace=False)
                elif spec.kind == "ebnf":
                    compiled = self._compiler.compile_grammar(spec.source)
                else:
                    raise ValueError(f"unknown grammar kind {spec.kind!r}")
            except ValueError:
                raise
            except Exception as e:  # xgrammar raises RuntimeError and its own types for bad input
                raise ValueError(f"{spec.kind} does not compile: {str(e).splitlines()[0] if str(e) else e}") from None
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[spec] = compiled
            return compiled


class RequestGrammar:
    """One request's matcher over its committed output."""

    def __init__(self, compiled):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = compiled.tokenizer_info.vocab_size

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()

    def allowed_rows(self, drafts: list[int], rows: int) -> torch.Tensor:
        """[rows, vocab] bool: row j's allowed tokens after the output plus drafts[:j]. Rows past
        a draft the grammar refuses, or past the stop token, are never reached by verification:
        they allow everything."""
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(rows, self.vocab_size)
        filled = walked = 0
        for j in range(rows):
            if self.matcher.is_terminated():  # the stop token was a draft: nothing follows it
                break
            self.matcher.fill_next_token_bitmask(bitmask, j)
            filled += 1
            if j == rows - 1 or not self.matcher.accept_token(drafts[j]):
                break
            walked += 1
        if walked:
            self.matcher.rollback(walked)
        allowed = _unpack(bitmask, self.vocab_size)
        allowed[filled:] = True
        return allowed

    def accept(self, tok: int) -> bool:
        """Advance over one committed token; False (the matcher unchanged) if the grammar refuses it."""
        return self.matcher.accept_token(tok)

    def advance(self, committed: list[int]) -> bool:
        """`accept` over several tokens, stopping at the first the grammar refuses (False)."""
        return all(self.accept(tok) for tok in committed)


def _unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """xgrammar's packed int32 bitmask [rows, ceil(V / 32)] -> bool [rows, V]."""
    bits = torch.arange(32, dtype=torch.int32)
    unpacked = (bitmask.unsqueeze(-1) >> bits) & 1
    return unpacked.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()
