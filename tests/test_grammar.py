"""Structured output under speculation (regex, JSON schema, EBNF through xgrammar): the per-row masks
for a draft block (the failure modes other servers shipped: a draft leaving the grammar mid-block,
a rejection right after a grammar state change, a grammar ending inside a draft block), greedy
output equal to K = 0 constrained decoding, and exact sampling under a mask."""

import json
import re
from collections import Counter

import pytest
import torch
import xgrammar as xgr

from aurora_sgl.engine.grammar import GrammarCompiler, GrammarSpec, RequestGrammar
from aurora_sgl.engine.sampling import SamplingParams, probs_from_logits
from helpers import PROMPTS, chi2_critical_999, chi_square, tiny_engines  # noqa: E402

DIGITS_THEN_WORD = r"[0-9]{3}-(yes|no)"


@pytest.fixture(scope="module")
def compiler(ref_tokenizer):
    return GrammarCompiler(ref_tokenizer, len(ref_tokenizer), {ref_tokenizer.eos_token_id})


def _ids(tok, text):
    """Token ids spelling `text` one character per token (every character here is a token)."""
    ids = [tok.convert_tokens_to_ids(c) for c in text]
    assert all(isinstance(i, int) and i != tok.unk_token_id for i in ids), text
    return ids


def _allowed_now(grammar):
    return grammar.allowed_rows([], 1)[0]


def test_a_draft_leaving_the_grammar_mid_block_masks_it_and_nothing_after(compiler, ref_tokenizer):
    g = RequestGrammar(compiler.compile(GrammarSpec("regex", DIGITS_THEN_WORD)))
    before = _allowed_now(g)
    one, two, x, three = _ids(ref_tokenizer, "12x3")
    rows = g.allowed_rows([one, two, x, three], 5)
    assert rows[0, one] and rows[1, two] and not rows[2, x]  # x is refused where it was drafted
    assert rows[3:].all()  # past the refused draft: never reached by verification
    assert torch.equal(_allowed_now(g), before)  # rolled back to the committed output
    assert g.advance([one, two]) and _allowed_now(g)[three] and not _allowed_now(g)[x]


def test_a_rejection_right_after_a_grammar_state_change(compiler, ref_tokenizer):
    """The third digit moves the grammar from digits to '-': the row after it must be the new
    state's mask, and a verifier that rejects that digit must leave the matcher before it."""
    g = RequestGrammar(compiler.compile(GrammarSpec("regex", DIGITS_THEN_WORD)))
    d1, d2, d3, dash, y = _ids(ref_tokenizer, "123-y")
    rows = g.allowed_rows([d1, d2, d3, dash], 5)
    assert rows[2, d3] and rows[2, d1]  # still digits
    assert rows[3, dash] and not rows[3, d1]  # the state changed after the third digit
    assert rows[4, y] and not rows[4, dash]
    g.advance([d1, d2, _ids(ref_tokenizer, "7")[0]])  # the target rejected d3 and said 7
    now = _allowed_now(g)
    assert now[dash] and not now[d1]


def test_a_grammar_ending_inside_a_draft_block(compiler, ref_tokenizer):
    eos = ref_tokenizer.eos_token_id
    g = RequestGrammar(compiler.compile(GrammarSpec("regex", r"ab")))
    a, b, c = _ids(ref_tokenizer, "abc")
    rows = g.allowed_rows([a, b, eos, c], 5)
    assert rows[2, eos] and rows[2].sum() == 1  # complete: only the stop token
    assert rows[3:].all()  # nothing follows the stop token
    assert not g.terminated  # the drafted stop token was rolled back
    assert g.advance([a, b]) and not g.terminated


def test_bad_grammars_are_value_errors(compiler):
    for spec in (GrammarSpec("regex", "(unclosed"), GrammarSpec("json_schema", "{not json"), GrammarSpec("ebnf", "x")):
        with pytest.raises(ValueError):
            compiler.compile(spec)


@pytest.fixture(scope="module")
def engines(tiny_model, ref_tokenizer, tiny_head_dir):
    return tiny_engines(tiny_model, ref_tokenizer, tiny_head_dir, (0, 1, 4))


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
EBNF = 'root ::= "say " word " " word "."\nword ::= [a-z]+'


@pytest.mark.parametrize(
    "constraint",
    [{"regex": DIGITS_THEN_WORD}, {"json_schema": json.dumps(SCHEMA)}, {"ebnf": EBNF}],
    ids=["regex", "json_schema", "ebnf"],
)
def test_constrained_greedy_equals_k0_and_follows_the_grammar(engines, constraint):
    sp = SamplingParams(max_new_tokens=40, **constraint)
    want = engines[0].generate(PROMPTS, sp)
    for k in (1, 4):
        got = engines[k].generate(PROMPTS, sp)
        assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want], k
    for o in want:
        if o["meta_info"]["finish_reason"] != "stop":
            continue  # cut by max_new_tokens: a prefix of a valid string
        if "regex" in constraint:
            assert re.fullmatch(DIGITS_THEN_WORD, o["text"]), o["text"]
        elif "json_schema" in constraint:
            value = json.loads(o["text"])
            assert set(value) == {"name", "age"} and isinstance(value["age"], int), value
        else:
            assert re.fullmatch(r"say [a-z]+ [a-z]+\.", o["text"]), o["text"]


def test_grammar_with_ignore_eos_ends_at_the_grammar_end(engines, ref_tokenizer):
    """The grammar's stop token ends the request even under ignore_eos: it is the last output id and
    the matched stop (SGLang: FINISH_MATCHED_TOKEN(output_ids[-1]) when the grammar terminates)."""
    eos = ref_tokenizer.eos_token_id
    for k in (0, 4):
        out = engines[k].generate(PROMPTS[0], SamplingParams(max_new_tokens=30, regex="abc", ignore_eos=True))[0]
        assert out["text"] == "abc" and out["meta_info"]["finish_reason"] == "stop", out
        assert out["output_ids"][-1] == eos and out["meta_info"]["matched_stop"] == eos, out


def test_a_grammar_ending_on_eos_keeps_it_and_stops_there(engines, ref_tokenizer):
    """Without ignore_eos the grammar's end is the EOS: in output_ids (the grammar accepted it, the
    request is not aborted), not in the text; K = 4 equals K = 0."""
    eos = ref_tokenizer.eos_token_id
    sp = SamplingParams(max_new_tokens=30, regex="abc")
    want = engines[0].generate(PROMPTS[:4], sp)
    for k in (0, 4):
        outs = engines[k].generate(PROMPTS[:4], sp)
        assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in want]
        for o in outs:
            assert o["text"] == "abc" and o["output_ids"][-1] == eos, o
            assert (o["meta_info"]["finish_reason"], o["meta_info"]["matched_stop"]) == ("stop", eos)
            assert o["meta_info"]["completion_tokens"] == len(o["output_ids"])


def _exact_constrained(model, tok, compiled, prompt, params, length: int) -> dict:
    """P(first `length` tokens) of target-only sampling under the grammar (xgrammar's own matcher
    as the reference), each position masked then sampled with `params`."""
    ids = tok(prompt, return_tensors="pt").input_ids
    t, tp, tk = torch.tensor([params.temperature]), torch.tensor([params.top_p]), torch.tensor([params.top_k])
    dist, ended = {(): 1.0}, Counter()  # ended: outputs that stopped (the stop token is their last id)
    with torch.no_grad():
        for _ in range(length):
            longer = {}
            for prefix, mass in dist.items():
                matcher = xgr.GrammarMatcher(compiled)
                assert all(matcher.accept_token(x) for x in prefix)
                bitmask = xgr.allocate_token_bitmask(1, len(tok))
                matcher.fill_next_token_bitmask(bitmask)
                logits = model(torch.cat([ids, torch.tensor([list(prefix)], dtype=torch.long)], 1)).logits[:, -1]
                xgr.apply_token_bitmask_inplace(logits, bitmask)
                probs = probs_from_logits(logits, t, tp, tk)[0]
                for b in probs.nonzero().flatten().tolist():
                    if b == tok.eos_token_id:
                        ended[prefix + (b,)] += mass * float(probs[b])
                    else:
                        longer[prefix + (b,)] = mass * float(probs[b])
            dist = longer
    return {**dist, **ended}


@pytest.mark.parametrize("k", [1, 4])
def test_constrained_sampling_is_exact(engines, tiny_model, ref_tokenizer, compiler, k):
    regex = r"(ab|ba|cd)[0-9]"
    params = dict(max_new_tokens=3, temperature=1.0, regex=regex)
    compiled = compiler.compile(GrammarSpec("regex", regex))
    exact = _exact_constrained(tiny_model, ref_tokenizer, compiled, PROMPTS[1], SamplingParams(**params), 3)
    n = 1200
    outs = engines[k].generate([PROMPTS[1]] * n, [SamplingParams(seed=s, **params) for s in range(n)])
    counts = Counter(tuple(o["output_ids"]) for o in outs)
    assert set(counts) <= set(exact)
    chi2, cells = chi_square(counts, exact, n)
    assert chi2 < chi2_critical_999(cells - 1), (chi2, cells)
