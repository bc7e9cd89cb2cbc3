"""Sampling controls over the generated text (frequency / presence / repetition penalties, min new
tokens, logit bias) under speculation: the math against a naive per-token reference, greedy output
equal to K = 0 with the same controls, and sampling exact against the controlled distribution."""

from collections import Counter

import pytest
import torch

from aurora_sgl.engine.penalties import controlled_logits
from aurora_sgl.engine.sampling import SamplingParams, probs_from_logits
from helpers import MAX_NEW, PROMPTS, chi2_critical_999, chi_square, tiny_engines  # noqa: E402


def naive_controls(row: torch.Tensor, p: SamplingParams, history: list[int], stop_ids: set[int]) -> torch.Tensor:
    """SGLang 0.5.23's penalizers and logit bias, one token at a time, in its order."""
    row = row.float().clone()
    counts = Counter(history)
    for t, c in counts.items():
        row[t] -= p.frequency_penalty * c
    if len(history) < p.min_new_tokens:
        for t in stop_ids:
            row[t] = float("-inf")
    for t in counts:
        row[t] -= p.presence_penalty
    for t in counts:
        row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t, b in (p.logit_bias or {}).items():
        row[t] += b
    return row


ALL_CONTROLS = dict(
    frequency_penalty=0.7,
    presence_penalty=-0.4,
    repetition_penalty=1.6,
    min_new_tokens=4,
    logit_bias={"3": 2.5, "11": -1.0},
)


def test_each_row_is_controlled_as_if_its_drafts_were_generated():
    gen = torch.Generator().manual_seed(0)
    vocab, k = 40, 4
    p = SamplingParams(max_new_tokens=16, **ALL_CONTROLS)
    for trial in range(20):
        logits = torch.randn(k + 1, vocab, generator=gen) * 3
        output = torch.randint(0, 12, (trial % 5,), generator=gen).tolist()  # small ids: repeats
        drafts = torch.randint(0, 12, (k,), generator=gen).tolist()
        got = controlled_logits(logits, p, output, drafts, stop_ids={0, 7})
        for j in range(k + 1):
            want = naive_controls(logits[j], p, output + drafts[:j], {0, 7})
            assert torch.allclose(got[j], want, atol=1e-5), (trial, j)


def test_a_control_at_its_neutral_value_changes_nothing():
    logits = torch.randn(3, 20)
    same = controlled_logits(logits, SamplingParams(), [1, 2, 2], [3, 4], {0})
    assert torch.equal(same, logits)


@pytest.fixture(scope="module")
def engines(tiny_model, ref_tokenizer, tiny_head_dir):
    return tiny_engines(tiny_model, ref_tokenizer, tiny_head_dir, (0, 1, 3))


def _greedy(engine, **controls):
    return [o["output_ids"] for o in engine.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, **controls))]


@pytest.mark.parametrize(
    "controls",
    [
        dict(frequency_penalty=2.0),
        dict(presence_penalty=2.0),
        dict(repetition_penalty=2.0),
        dict(logit_bias={"9": 8.0}),
        ALL_CONTROLS,
    ],
    ids=["frequency", "presence", "repetition", "logit_bias", "all"],
)
def test_greedy_with_controls_equals_k0(engines, controls):
    plain = _greedy(engines[0])
    want = _greedy(engines[0], **controls)
    assert want != plain  # the control does something on these prompts
    for k in (1, 3):
        assert _greedy(engines[k], **controls) == want, k


def test_min_new_tokens_holds_off_eos_under_speculation(engines, ref_tokenizer):
    eos = ref_tokenizer.eos_token_id
    assert all(out == [eos] for out in _greedy(engines[0], logit_bias={str(eos): 100.0}))  # eos at once
    for k in (0, 1, 3):
        outs = _greedy(engines[k], logit_bias={str(eos): 100.0}, min_new_tokens=5)
        # five tokens, then the EOS (the last output id, as SGLang keeps it)
        assert all(len(out) == 6 and out[-1] == eos and eos not in out[:5] for out in outs), (k, outs)


def _exact_with_controls(model, tok, prompt, params, stop_ids, length: int = 3) -> dict:
    """P(first `length` tokens) of target-only sampling, each position controlled by the naive
    reference over the tokens before it."""
    ids = tok(prompt, return_tensors="pt").input_ids
    t, tp, tk = torch.tensor([params.temperature]), torch.tensor([params.top_p]), torch.tensor([params.top_k])
    dist = {(): 1.0}
    with torch.no_grad():
        for _ in range(length):
            longer = {}
            for prefix, mass in dist.items():
                context = torch.cat([ids, torch.tensor([list(prefix)], dtype=torch.long)], 1)
                row = naive_controls(model(context).logits[0, -1], params, list(prefix), stop_ids)
                probs = probs_from_logits(row.unsqueeze(0), t, tp, tk)[0]
                for b in probs.nonzero().flatten().tolist():
                    longer[prefix + (b,)] = mass * float(probs[b])
            dist = longer
    return dist


@pytest.mark.parametrize("k", [1, 3])
def test_sampling_with_controls_is_exact(engines, tiny_model, ref_tokenizer, k):
    """The first token comes from prefill; the first decode step's rows then continue it plus
    0, 1, ... drafts. Three tokens put a row past an accepted draft in the window (at K = 1 the
    bonus token): it must count that draft as generated. Negative penalties, which favour
    repeating earlier tokens, make a row that forgot the draft visible."""
    eng = engines[k]
    params = dict(max_new_tokens=3, temperature=0.9, top_k=3, ignore_eos=True, repetition_penalty=1.3)
    params.update(frequency_penalty=-2.0, presence_penalty=-1.0, logit_bias={"5": 1.5})
    exact = _exact_with_controls(tiny_model, ref_tokenizer, PROMPTS[0], SamplingParams(**params), eng.eos_ids)
    n = 1200
    outs = eng.generate([PROMPTS[0]] * n, [SamplingParams(seed=s, **params) for s in range(n)])
    counts = Counter(tuple(o["output_ids"]) for o in outs)
    assert set(counts) <= set(exact)
    chi2, cells = chi_square(counts, exact, n)
    assert chi2 < chi2_critical_999(cells - 1), (chi2, cells)
