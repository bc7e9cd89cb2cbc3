"""The fallback head: how a request's drafting head is chosen (against naive references), and that
batches drafted by several heads at once stay exact (greedy token for token, T > 0 in distribution)."""

import pytest
import torch

from aurora_sgl.engine.engine import Engine
from aurora_sgl.engine.head_choice import (
    DECIDE_AFTER_TOKENS,
    SCORE_CONTEXT,
    SCORE_POSITIONS,
    HeadEvidence,
    choose_head,
    head_score,
    usual_head,
)
from aurora_sgl.engine.sampling import SamplingParams
from aurora_sgl.records import NO_TOKEN, Outcome, StepRecord
from helpers import MAX_NEW, PROMPTS, exact_two_token_dist  # noqa: E402


def _engine(model, tok, k=3, **kw):
    kw.setdefault("prefill_chunk_size", 5)
    return Engine(model=model, tokenizer=tok, num_speculative_steps=k, **kw)


def _naive_choice(scores, margin, incumbent):
    better = [(s, -i) for i, s in enumerate(scores) if i != incumbent and s > scores[incumbent] + margin]
    return -max(better)[1] if better else incumbent


@pytest.mark.parametrize("incumbent", [0, 1])
@pytest.mark.parametrize(
    "scores",
    [[2.0, 2.04], [2.0, 2.06], [2.0, 2.06, 2.5], [2.0, 2.5, 2.5], [3.0, 1.0, 2.9], [1.0, 1.2, 1.1], [2.0, 2.0, 2.0]],
)
def test_choose_head_moves_to_the_best_other_head_only_past_the_margin(scores, incumbent):
    assert choose_head(scores, 0.05, incumbent) == _naive_choice(scores, 0.05, incumbent)
    assert choose_head([2.0], 0.05) == 0


@pytest.mark.parametrize("recent,usual", [([], 0), ([1, 1, 0], 1), ([1, 0], 0), ([2, 1, 1, 2], 1), ([0, 2, 2], 2)])
def test_a_new_request_starts_from_the_head_recent_requests_ended_with(recent, usual):
    assert usual_head(recent) == usual


def test_evidence_scores_the_newest_rows_against_the_next_target_token():
    ev, rows, pos = HeadEvidence(), [], 0
    for n, scored in ((50, False), (30, True), (20, True), (1, True), (3, True)):
        aux = torch.randn(n, 6)
        following = torch.randint(0, 100, (n,))
        target = torch.randint(0, 100, (n,))
        ev.add(aux, following, pos, target if scored else None)
        rows += [(aux[i], following[i], target[i]) for i in range(n) if scored]
        pos += n
    assert [start for _, _, start in ev.context] == [0, 50, 80, 100, 101]  # every row, in order
    aux, following, target_next = ev.score_rows()
    newest = rows[-SCORE_POSITIONS:]
    assert torch.equal(aux, torch.stack([a for a, _, _ in newest]))
    assert torch.equal(following, torch.stack([f for _, f, _ in newest]))
    assert target_next.tolist() == [int(t) for _, _, t in newest[1:]] + [-1]
    # The final choice: starts from position 100 on only (the rows of the last two pieces), after
    # SCORE_CONTEXT rows of context whose starts are not scored.
    aux, following, target_next = ev.score_rows(first_start=100)
    window = rows[-(4 + SCORE_CONTEXT) :]
    assert torch.equal(aux, torch.stack([a for a, _, _ in window]))
    want = [int(t) for _, _, t in window[1:]] + [-1]
    assert target_next.tolist() == [-1] * SCORE_CONTEXT + want[SCORE_CONTEXT:]


def _naive_head_score(head, aux, following, target_next, k):
    """For every start s: the head drafts as serving does -- teacher-forced over positions <= s in
    a fresh cache, then its own chain -- and counts the drafts matching target_next[s], [s + 1], ..."""
    hc = head.config
    taus = []
    for s in range(aux.shape[0]):
        if target_next[s] < 0:
            continue
        kc = torch.zeros(1, hc.num_key_value_heads, aux.shape[0] + k + 1, hc.head_dim)
        vc = torch.zeros_like(kc)
        slots = torch.tensor([0])
        hidden = head.forward_cached(
            aux[None, : s + 1], following[None, : s + 1], torch.arange(s + 1)[None], kc, vc, slots
        )
        hidden = hidden[:, -1]
        tau = 1
        for j in range(k):
            draft = head.hot_ids[head.logits(hidden).argmax(-1)]
            if s + j >= len(target_next) or int(draft) != int(target_next[s + j]):
                break
            tau += 1
            hidden = head.forward_cached(hidden[:, None], draft[:, None], torch.tensor([[s + j + 1]]), kc, vc, slots)
            hidden = hidden[:, 0]
        taus.append(tau)
    return sum(taus) / len(taus)


@torch.no_grad()
def test_head_score_is_the_accept_length_serving_would_see(tiny_model, ref_tokenizer, tiny_head_dir):
    eng = _engine(tiny_model, ref_tokenizer, draft_model_path=tiny_head_dir)
    ids = ref_tokenizer(PROMPTS[1] + " " + PROMPTS[2])["input_ids"]
    t = len(ids)
    out = eng.target.forward(torch.tensor([ids]), torch.arange(t)[None], torch.tensor([0]))
    greedy = out.logits[0].argmax(-1)
    aux, following = out.aux_hidden[0, :-1], torch.tensor(ids[1:])
    # The head's own greedy continuation makes long chains; the target's greedy choices are checked too.
    for target_next in (
        torch.cat([greedy[1:-1], torch.tensor([-1])]),
        following.roll(-1).index_fill(0, torch.tensor([t - 2]), -1),
    ):
        got = head_score(eng.head, aux, following, target_next, 3)
        want = _naive_head_score(eng.head, aux, following, target_next, 3)
        assert got == pytest.approx(want, abs=1e-6)
    assert head_score(eng.head, aux, following, torch.full_like(following, -1), 3) == 1.0


def _mixed(model, tok, head_dir, switch=False, **kw):
    """An engine drafting with a random live head and the trained head as fallback, whose draft
    vocabulary differs from the live head's; requests alternate between the two at their prefill,
    and with `switch` every request changes head at its final choice."""
    eng = _engine(model, tok, draft_model_path=head_dir, **kw)
    fallback = eng.add_fallback_head()
    eng.head.reset_parameters(seed=5)
    hot = torch.randperm(eng.head.config.vocab_size, generator=torch.Generator().manual_seed(3))
    eng.head.set_draft_vocab(hot[: eng.head.config.draft_vocab_size])
    assert not torch.equal(eng.head.hot_ids, fallback.hot_ids)
    chosen = iter(range(10**6))
    first: dict[str, int] = {}

    def policy(r, scores):
        if r.id not in first:
            first[r.id] = next(chosen) % 2
            return first[r.id]
        return 1 - first[r.id] if switch else first[r.id]

    eng.head_policy = policy
    return eng


@pytest.mark.parametrize("switch", [False, True])
@pytest.mark.parametrize("concurrency", [1, 8])
def test_greedy_stays_lossless_when_a_batch_drafts_with_two_heads(
    tiny_model, ref_tokenizer, tiny_head_dir, concurrency, switch
):
    plain = _engine(tiny_model, ref_tokenizer, k=0)
    sp = [SamplingParams(max_new_tokens=MAX_NEW - (i % 3) * 5) for i in range(len(PROMPTS))]  # finish apart
    want = [o["output_ids"] for o in plain.generate(PROMPTS, sp)]
    eng = _mixed(tiny_model, ref_tokenizer, tiny_head_dir, switch=switch, max_running_requests=concurrency)
    reqs = [eng.add_request(p, params) for p, params in zip(PROMPTS, sp)]
    eng.run_until_done(reqs)
    assert [r.output_ids for r in reqs] == want
    heads = [r.meta_info()["spec_draft_head"] for r in reqs]
    assert heads.count("live") and heads.count("fallback1"), heads
    long = [r for r in reqs if len(r.output_ids) > DECIDE_AFTER_TOKENS]
    assert long and all(r.head_switched == switch for r in long)
    if not switch:  # the trained fallback really drafted its requests (the random live head: ~nothing)
        taus = {h: [r.accept_length for r, hr in zip(reqs, heads) if hr == h] for h in set(heads)}
        assert sum(taus["fallback1"]) / len(taus["fallback1"]) > sum(taus["live"]) / len(taus["live"]) + 0.3, taus


def test_a_head_taking_over_rebuilds_its_cache_over_the_whole_context(tiny_model, ref_tokenizer, tiny_head_dir):
    """After a switch, the new head's cache over every committed position equals the cache of an
    engine that drafted with that head from the start (a one-layer head's keys and values at a
    position depend on that position's inputs only)."""
    prompt, sp = PROMPTS[4], SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    eng = _mixed(tiny_model, ref_tokenizer, tiny_head_dir, switch=True)
    eng.head_policy = lambda r, scores: 1 if len(r.output_ids) >= DECIDE_AFTER_TOKENS else 0  # live, then fallback
    req = eng.add_request(prompt, sp)
    while not (req.head_switched and not req.head_pending and req.head_hidden is not None):
        eng.step()
    n = req.last_position
    switched = eng.head_k[req.slot, :, :n].clone(), eng.head_v[req.slot, :, :n].clone()

    alone = _engine(tiny_model, ref_tokenizer, draft_model_path=tiny_head_dir)
    other = alone.add_request(prompt, sp)
    while other.last_position < n:
        alone.step()
    assert torch.allclose(switched[0], alone.head_k[other.slot, :, :n], atol=1e-5)
    assert torch.allclose(switched[1], alone.head_v[other.slot, :, :n], atol=1e-5)


def test_sampling_stays_exact_when_a_batch_drafts_with_two_heads(tiny_model, ref_tokenizer, tiny_head_dir):
    params = dict(max_new_tokens=2, temperature=0.9, top_k=3, ignore_eos=True)
    prompt = PROMPTS[0]
    exact = exact_two_token_dist(tiny_model, ref_tokenizer, prompt, SamplingParams(**params))
    eng = _mixed(tiny_model, ref_tokenizer, tiny_head_dir, max_running_requests=16)
    n = 900
    outs = eng.generate([prompt] * n, [SamplingParams(seed=s, **params) for s in range(n)])
    assert {o["meta_info"]["spec_draft_head"] for o in outs} == {"live", "fallback1"}
    counts = {}
    for o in outs:
        counts[tuple(o["output_ids"])] = counts.get(tuple(o["output_ids"]), 0) + 1
    assert set(counts) <= set(exact)
    cells = [c for c in exact if exact[c] * n >= 5]
    chi2 = sum((counts.get(c, 0) - exact[c] * n) ** 2 / (exact[c] * n) for c in cells)
    assert chi2 < 27.9, (chi2, len(cells))  # df <= 8 at p = 0.001


def test_the_head_that_knows_the_prompt_drafts_it(tiny_model, ref_tokenizer, tiny_head_dir):
    """Scored for real (no policy): a random live head hands every request to the trained fallback;
    a trained live head keeps them all from a random fallback. The prompts end with text the trained
    head has learned (the target's own continuation of the training prompts)."""
    plain = _engine(tiny_model, ref_tokenizer, k=0)
    prompts = [ref_tokenizer(p)["input_ids"] + o["output_ids"][:16] for p, o in zip(PROMPTS, plain.generate(PROMPTS))]
    sp = SamplingParams(max_new_tokens=8)
    eng = _engine(tiny_model, ref_tokenizer, draft_model_path=tiny_head_dir, max_running_requests=8)
    eng.add_fallback_head()
    eng.head.reset_parameters(seed=5)
    assert {o["meta_info"]["spec_draft_head"] for o in eng.generate(prompts, sp)} == {"fallback1"}

    eng = _engine(tiny_model, ref_tokenizer, draft_model_path=tiny_head_dir, max_running_requests=8)
    eng.add_fallback_head().reset_parameters(seed=5)
    assert {o["meta_info"]["spec_draft_head"] for o in eng.generate(prompts, sp)} == {"live"}


def test_a_fallback_is_a_copy_the_live_heads_swaps_do_not_touch(tiny_model, ref_tokenizer, tiny_head_dir):
    eng = _engine(tiny_model, ref_tokenizer, draft_model_path=tiny_head_dir)
    fallback = eng.add_fallback_head()
    before = {k: v.clone() for k, v in fallback.serving_state().items()}
    with torch.no_grad():
        for p in eng.head.serving_state().values():
            p.zero_()  # what a swap does: copies into the live head's tensors
    assert all(torch.equal(before[k], v) for k, v in fallback.serving_state().items())
    assert fallback.embed_weight.data_ptr() == eng.head.embed_weight.data_ptr()  # the target's, shared


def test_the_flywheel_judges_the_live_version_on_its_own_drafts_only(tiny_model, ref_tokenizer, tiny_head_dir):
    from aurora_sgl.online.sidecar import OnlineTraining

    eng = _engine(tiny_model, ref_tokenizer, draft_model_path=tiny_head_dir)
    online = OnlineTraining(eng, model_path="unused", init_head=tiny_head_dir)
    try:
        assert len(eng.fallback_heads) == 1  # a pretrained start stays as the fallback

        def record(head, accepted):
            none = torch.full((eng.k,), NO_TOKEN)
            return StepRecord(
                request_id="r",
                position=10,
                draft_tokens=none,
                target_tokens=none,
                outcome=torch.full((eng.k,), Outcome.NOT_REACHED, dtype=torch.int8),
                num_accepted=accepted,
                committed=[1],
                input_tokens=torch.ones(accepted + 1, dtype=torch.long),
                next_tokens=torch.ones(accepted + 1, dtype=torch.long),
                aux_hidden=torch.zeros(accepted + 1, 3 * 64),
                final_hidden=torch.zeros(accepted + 1, 64),
                draft_version=eng.draft_version,
                num_drafted=eng.k,
                draft_head=head,
            )

        online.flywheel.record_sink([record(0, 0), record(1, 3), record(1, 3)])
        assert online.flywheel.live_accept_length(eng.draft_version) == pytest.approx(1.0)
    finally:
        online.close()
    eng2 = _engine(tiny_model, ref_tokenizer)
    online = OnlineTraining(eng2, model_path="unused")  # a random start: nothing to fall back to
    online.close()
    assert eng2.fallback_heads == []
