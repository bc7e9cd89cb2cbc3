"""Embedded engine on a small random Llama: lossless greedy decoding against transformers
`generate`, exact sampling, stop conditions, streaming, records and continuous batching."""

import itertools
import math

import pytest
import torch

from aurora_sgl.engine.engine import Engine, PromptTooLong
from aurora_sgl.engine.sampling import SamplingParams
from aurora_sgl.records import Outcome
from aurora_sgl.trainer.stitcher import Stitcher
from helpers import MAX_NEW, PROMPTS, exact_two_token_dist  # noqa: E402


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def hf_greedy(model, ref_tokenizer):
    outs = []
    for p in PROMPTS:
        ids = ref_tokenizer(p, return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=ref_tokenizer.pad_token_id)
        seq = gen[0, ids.shape[1] :].tolist()
        if ref_tokenizer.eos_token_id in seq:  # the EOS is the last output id (SGLang keeps it)
            seq = seq[: seq.index(ref_tokenizer.eos_token_id) + 1]
        outs.append(seq)
    return outs


@pytest.fixture(scope="module")
def trained_head_dir(tiny_head_dir):
    return tiny_head_dir


def _engine(model, tok, k, **kw):
    kw.setdefault("prefill_chunk_size", 5)
    return Engine(model=model, tokenizer=tok, num_speculative_steps=k, **kw)


@pytest.mark.parametrize("head", ["random", "trained"])
@pytest.mark.parametrize("concurrency", [1, 8])
def test_greedy_is_lossless_for_every_k(model, ref_tokenizer, hf_greedy, trained_head_dir, head, concurrency):
    taus = []
    for k in range(0, 7):
        eng = _engine(
            model,
            ref_tokenizer,
            k,
            max_running_requests=concurrency,
            draft_model_path=trained_head_dir if head == "trained" else None,
        )
        # Batched, every prompt runs at every K (rows of one step at different lengths); alone,
        # each K runs a third of them, so every prompt still meets two or three values of K.
        chosen = range(len(PROMPTS)) if concurrency > 1 else range(k % 3, len(PROMPTS), 3)
        outs = eng.generate([PROMPTS[i] for i in chosen], SamplingParams(max_new_tokens=MAX_NEW))
        for i, out in zip(chosen, outs):
            assert out["output_ids"] == hf_greedy[i], (k, PROMPTS[i])
        if k:
            taus.append(sum(o["meta_info"]["spec_accept_length"] for o in outs) / len(outs))
    if head == "trained":
        assert max(taus) > 1.3, taus  # drafts really were accepted, so accept paths ran
    else:
        assert min(taus) < 1.2


def _changing_k(ks=(0, 3, 1, 4, 0, 0, 2, 4, 4, 1, 0, 2)):
    """A K schedule that changes between consecutive steps of one request (and goes through 0)."""
    it = itertools.cycle(ks)
    return lambda reqs: next(it)


@pytest.mark.parametrize("mode", ["changing", "adaptive"])
@pytest.mark.parametrize("concurrency", [1, 8])
def test_greedy_stays_lossless_when_k_changes_between_steps(
    model, ref_tokenizer, hf_greedy, trained_head_dir, mode, concurrency
):
    # The real chooser, probing every other step: K changes within each request whatever this
    # machine's step costs say (with the default 2 % budget a loaded machine may choose K = 0 throughout).
    eng = _engine(
        model,
        ref_tokenizer,
        4,
        max_running_requests=concurrency,
        draft_model_path=trained_head_dir,
        adaptive=True,
        explore_every=2,
        explore_share=100.0,
    )
    assert eng.adaptive is not None
    if mode == "changing":
        eng.k_policy = _changing_k()
    outs = eng.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW))
    for prompt, out, ref in zip(PROMPTS, outs, hf_greedy):
        assert out["output_ids"] == ref, (mode, prompt)
    k_steps = [o["meta_info"]["spec_k_steps"] for o in outs]
    assert all(len(ks) == 5 for ks in k_steps)
    if mode == "changing":
        assert all(sum(1 for n in ks if n) >= 3 for ks in k_steps if sum(ks) >= 6), k_steps
    else:
        assert all(sum(1 for n in ks if n) >= 2 for ks in k_steps if sum(ks) >= 4), k_steps
    assert max(o["meta_info"]["spec_accept_length"] for o in outs) > 1.3  # accept paths ran
    stats = eng.adaptive.stats()
    assert sum(stats["k_steps"].values()) == eng.adaptive.decode_steps
    if mode == "adaptive":  # every decode step's measured time fed the cost model
        assert eng.adaptive.costs.steps == eng.adaptive.decode_steps > 0


def test_requests_joining_mid_flight_stay_exact(model, ref_tokenizer, hf_greedy, trained_head_dir):
    eng = _engine(model, ref_tokenizer, 4, max_running_requests=4, draft_model_path=trained_head_dir)
    reqs = []
    for i, p in enumerate(PROMPTS):
        reqs.append(eng.add_request(p, SamplingParams(max_new_tokens=MAX_NEW)))
        if i % 3 == 2:
            eng.step()
    eng.run_until_done(reqs)
    for r, ref in zip(reqs, hf_greedy):
        assert r.output_ids == ref
    assert not eng.running and not eng.waiting


def test_abort_frees_slot_and_others_stay_exact(model, ref_tokenizer, hf_greedy):
    eng = _engine(model, ref_tokenizer, 3, max_running_requests=3)
    reqs = [eng.add_request(p, SamplingParams(max_new_tokens=MAX_NEW)) for p in PROMPTS[:6]]
    eng.step()
    eng.step()
    eng.abort(reqs[1])
    eng.abort(reqs[4])  # still waiting
    eng.run_until_done(reqs)
    assert reqs[1].finish_reason == "abort" and reqs[4].finish_reason == "abort"
    for i in (0, 2, 3, 5):
        assert reqs[i].output_ids == hf_greedy[i]
    assert not eng.running


@pytest.mark.parametrize("head", ["random", "trained", "trained, K changing"])
def test_sampling_matches_target_distribution(model, ref_tokenizer, trained_head_dir, head):
    params = dict(max_new_tokens=2, temperature=0.9, top_k=3, ignore_eos=True)
    prompt = PROMPTS[0]
    exact = exact_two_token_dist(model, ref_tokenizer, prompt, SamplingParams(**params))
    eng = _engine(
        model,
        ref_tokenizer,
        3,
        max_running_requests=16,
        draft_model_path=None if head == "random" else trained_head_dir,
    )
    if head == "trained, K changing":
        eng.k_policy = _changing_k((1, 0, 3, 2))
    n = 900
    outs = eng.generate([prompt] * n, [SamplingParams(seed=s, **params) for s in range(n)])
    counts = {}
    for o in outs:
        key = tuple(o["output_ids"])
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= set(exact)
    cells = [c for c in exact if exact[c] * n >= 5]  # chi-square over well-populated cells
    chi2 = sum((counts.get(c, 0) - exact[c] * n) ** 2 / (exact[c] * n) for c in cells)
    assert chi2 < 27.9, (chi2, len(cells))  # df <= 8 at p = 0.001


@pytest.mark.parametrize("adaptive", [False, True])
def test_seeded_sampling_is_reproducible(model, ref_tokenizer, trained_head_dir, adaptive):
    eng = _engine(model, ref_tokenizer, 4, draft_model_path=trained_head_dir, adaptive=adaptive)
    sp = SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.9, seed=123)
    a = eng.generate(PROMPTS[:3], sp)
    if adaptive:  # whatever K the timings would choose, a seeded request drafts the maximum
        assert all(o["meta_info"]["spec_k_steps"][:4] == [0, 0, 0, 0] for o in a)
    b = eng.generate(PROMPTS[:3], sp)
    assert [x["output_ids"] for x in a] == [x["output_ids"] for x in b]


def test_stop_conditions(model, ref_tokenizer, hf_greedy):
    eng = _engine(model, ref_tokenizer, 4)
    ref = hf_greedy[0]
    out = eng.generate(PROMPTS[0], SamplingParams(max_new_tokens=5))[0]
    assert out["output_ids"] == ref[:5] and out["meta_info"]["finish_reason"] == "length"
    # stop token id: the 4th greedy token, kept as the last output id (SGLang's output_ids and
    # completion_tokens) and left out of the text (SGLang's detokenizer trims the matched stop)
    stop_at = ref.index(ref[3])
    out = eng.generate(PROMPTS[0], SamplingParams(max_new_tokens=MAX_NEW, stop_token_ids=(ref[3],)))[0]
    assert out["output_ids"] == ref[: stop_at + 1] and out["meta_info"]["finish_reason"] == "stop"
    assert out["meta_info"]["matched_stop"] == ref[3] and out["meta_info"]["completion_tokens"] == stop_at + 1
    assert out["text"] == ref_tokenizer.decode(ref[:stop_at], skip_special_tokens=True)
    assert out["text"] != ref_tokenizer.decode(ref[: stop_at + 1], skip_special_tokens=True)  # its text is trimmed
    # stop string: text of tokens 5..7 of the greedy output
    full = ref_tokenizer.decode(ref, skip_special_tokens=True)
    stop = ref_tokenizer.decode(ref[5:7], skip_special_tokens=True)
    if stop.strip():
        out = eng.generate(PROMPTS[0], SamplingParams(max_new_tokens=MAX_NEW, stop=[stop]))[0]
        assert out["text"] == full[: full.index(stop)]
        assert out["meta_info"]["matched_stop"] == stop
    # max_new_tokens = 0 returns nothing
    out = eng.generate(PROMPTS[0], SamplingParams(max_new_tokens=0))[0]
    assert out["output_ids"] == [] and out["meta_info"]["finish_reason"] == "length"


EOS_BIAS = 2.0  # on the tiny model: EOS becomes the greedy token after 2..21 tokens on some prompts


def test_a_request_ending_on_eos_keeps_it_with_its_logprob(model, ref_tokenizer, trained_head_dir):
    """SGLang 0.5.23 appends a token before it checks the finish (Req.update_finish_state): the
    EOS is the last output id, has its logprob (and top logprobs), counts in completion_tokens,
    and is not in the text. K = 4 (EOS as the verify step's bonus token) equals K = 0."""
    eos = ref_tokenizer.eos_token_id
    params = SamplingParams(max_new_tokens=MAX_NEW, logit_bias={eos: EOS_BIAS}, return_logprob=True, top_logprobs_num=3)
    runs = {}
    for k in (0, 4):
        eng = _engine(model, ref_tokenizer, k, max_running_requests=8, draft_model_path=trained_head_dir if k else None)
        runs[k] = eng.generate(PROMPTS, params)
        assert not eng.running and not eng.waiting
    ended = 0
    for prompt, a, b in zip(PROMPTS, runs[0], runs[4]):
        assert a["output_ids"] == b["output_ids"] and a["text"] == b["text"]
        ids = b["output_ids"]
        vals, lp_ids = b["logprobs"]["output_token_logprobs"]
        assert lp_ids == ids and len(vals) == len(b["logprobs"]["output_top_logprobs"]) == len(ids)
        assert all(abs(x - y) <= 1e-4 for x, y in zip(vals, a["logprobs"]["output_token_logprobs"][0], strict=True))
        assert b["meta_info"]["completion_tokens"] == len(ids)
        if b["meta_info"]["finish_reason"] != "stop":
            assert eos not in ids
            continue
        ended += 1
        assert ids[-1] == eos and eos not in ids[:-1] and b["meta_info"]["matched_stop"] == eos
        assert math.isfinite(vals[-1]) and vals[-1] < -1.0  # the EOS's own logprob (biased by 2 only)
        assert b["text"] == ref_tokenizer.decode(ids[:-1]) and ref_tokenizer.eos_token not in b["text"]
        # streamed: the same ids, EOS in the last increment, the same text
        eng_stream = list(eng.stream(prompt, params))
        assert [t for c in eng_stream for t in c["token_ids"]] == ids
        assert eng_stream[-1]["token_ids"][-1] == eos and eng_stream[-1]["text"] == b["text"]
    assert ended >= 3 and any(len(o["output_ids"]) > 5 for o in runs[4] if o["meta_info"]["finish_reason"] == "stop")


def test_commit_keeps_the_stop_token_and_nothing_after_it(model, ref_tokenizer):
    """A verify step can accept drafts past a stop token: the stop token is the last output id, what
    follows is dropped; a stop token that is the max_new_tokens-th token still finishes with "stop"
    (SGLang checks the stop token before the length); ignore_eos makes EOS an ordinary token."""
    eng = _engine(model, ref_tokenizer, 0)
    eos = ref_tokenizer.eos_token_id
    a, b, c = ref_tokenizer(" the cat sat", add_special_tokens=False)["input_ids"][:3]

    def commit(tokens, **params):
        r = eng.add_request(PROMPTS[0], SamplingParams(**params))
        appended = eng._commit(r, tokens)
        assert r.output_ids == appended[: len(r.output_ids)]  # a stop string may cut what was appended
        return r

    r = commit([a, eos, b], max_new_tokens=10)
    assert r.output_ids == [a, eos] and (r.finish_reason, r.matched_stop) == ("stop", eos)
    assert eng.output_text(r) == ref_tokenizer.decode([a])
    r = commit([a, eos, b], max_new_tokens=2)
    assert r.output_ids == [a, eos] and (r.finish_reason, r.matched_stop) == ("stop", eos)
    r = commit([a, eos], max_new_tokens=1)
    assert r.output_ids == [a] and r.finish_reason == "length"
    r = commit([a, eos, b], max_new_tokens=10, ignore_eos=True)
    assert r.output_ids == [a, eos, b] and not r.finished
    r = commit([a, b, c], max_new_tokens=10, stop_token_ids=(b,))
    assert r.output_ids == [a, b] and (r.finish_reason, r.matched_stop) == ("stop", b)
    assert eng.output_text(r) == ref_tokenizer.decode([a]) != ref_tokenizer.decode([a, b])
    # a stop string in the same step wins, and cuts the output before the stop token
    word = ref_tokenizer.decode([b]).strip()
    r = commit([a, b, eos], max_new_tokens=10, stop=[word])
    assert r.output_ids == [a, b] and (r.finish_reason, r.matched_stop) == ("stop", word)
    full = ref_tokenizer.decode([a, b])
    assert eng.output_text(r) == full[: full.index(word)]


def test_context_length_caps_generation_and_rejects_long_prompts(model, ref_tokenizer):
    eng = _engine(model, ref_tokenizer, 4, context_length=40)
    ids = ref_tokenizer(PROMPTS[0])["input_ids"]
    out = eng.generate(ids, SamplingParams(max_new_tokens=100, ignore_eos=True))[0]
    assert len(ids) + len(out["output_ids"]) == 40 and out["meta_info"]["finish_reason"] == "length"
    with pytest.raises(PromptTooLong, match="context length is 40"):
        eng.add_request(list(range(5, 45)))
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([])
    with pytest.raises(ValueError, match="input_ids"):
        eng.add_request([1, -3])


def test_stream_yields_increments_of_the_full_output(model, ref_tokenizer, hf_greedy, trained_head_dir):
    eng = _engine(model, ref_tokenizer, 4, draft_model_path=trained_head_dir)
    chunks = list(eng.stream(PROMPTS[2], SamplingParams(max_new_tokens=MAX_NEW)))
    assert chunks[-1]["finished"]
    assert [t for c in chunks for t in c["token_ids"]] == hf_greedy[2]
    assert len(chunks) > 1


def test_step_records_describe_each_verify(model, ref_tokenizer, trained_head_dir):
    eng = _engine(model, ref_tokenizer, 4, draft_model_path=trained_head_dir)
    records = []
    eng.record_sink = records.extend
    eng.generate(PROMPTS[:4], SamplingParams(max_new_tokens=MAX_NEW))
    assert records
    h = model.config.hidden_size
    prompt_rows = {}
    for r in records:
        if r.prefill:  # prompt context, in pieces of at most K + 1 rows, no drafts
            assert r.aux_hidden.shape[0] == r.num_accepted + 1 <= 5 and bool((r.outcome == Outcome.NOT_REACHED).all())
            prompt_rows[r.request_id] = prompt_rows.get(r.request_id, 0) + r.num_accepted + 1
            continue
        acc = r.num_accepted
        assert int((r.outcome == Outcome.ACCEPTED).sum()) == acc
        assert r.aux_hidden.shape == (acc + 1, 3 * h) and r.final_hidden.shape == (acc + 1, h)
        assert torch.equal(r.input_tokens[1:], r.draft_tokens[:acc])
        if acc < 4:
            assert r.outcome[acc] == 0 and bool((r.outcome[acc + 1 :] == Outcome.NOT_REACHED).all())
            assert r.target_tokens[acc] != r.draft_tokens[acc]
        assert r.committed == r.next_tokens.tolist()[: len(r.committed)]
    assert any(r.num_accepted > 0 for r in records if not r.prefill)
    reqs = {r.request_id for r in records}
    assert len(prompt_rows) == len(reqs) == 4
    lens = sorted(len(ref_tokenizer(p)["input_ids"]) for p in PROMPTS[:4])
    assert sorted(prompt_rows.values()) == lens


def test_records_cover_every_committed_position_when_k_changes(model, ref_tokenizer, trained_head_dir):
    """Steps at K = 0 still record the target's states (the trainer's kl objective needs no drafts),
    every record carries the ring's K positions, and together the records of a request cover each
    committed position once, in order."""
    from aurora_sgl.records import NO_TOKEN
    from aurora_sgl.transport.signal_ring import SignalRing

    eng = _engine(model, ref_tokenizer, 4, draft_model_path=trained_head_dir)
    eng.k_policy = _changing_k((0, 0, 2, 4, 0, 1))
    records = []
    eng.record_sink = records.extend
    outs = eng.generate(PROMPTS[:3], SamplingParams(max_new_tokens=MAX_NEW))
    decode = [r for r in records if not r.prefill]
    assert {r.num_drafted for r in decode} == {0, 1, 2, 4}
    for r in decode:
        assert r.draft_tokens.shape == r.target_tokens.shape == r.outcome.shape == (4,)
        d = r.num_drafted
        assert bool((r.draft_tokens[d:] == NO_TOKEN).all()) and bool((r.draft_tokens[:d] != NO_TOKEN).all())
        assert bool((r.outcome[d:] == Outcome.NOT_REACHED).all()) and r.num_accepted <= d
    for out in outs:
        mine = [r for r in decode if r.request_id == out["meta_info"]["id"]]
        positions = [p for r in mine for p in range(r.position, r.position + r.input_tokens.numel())]
        first = out["meta_info"]["prompt_tokens"]
        assert positions == list(range(first, first + len(positions)))
        committed = [t for r in mine for t in r.committed]
        assert committed == out["output_ids"][1:]  # the first token comes from the prefill
    h = model.config.hidden_size
    writer = SignalRing.create("test_eng_kmix", len(records), 5, 3 * h, h, 4)
    reader = SignalRing.attach(writer.spec())
    try:
        writer.write_many(records)  # the ring takes every record as it is
        back = reader.read(len(records))
        assert [b.num_accepted for b in back] == [r.num_accepted for r in records]
        assert [b.prefill for b in back] == [r.prefill for r in records]
    finally:
        reader.close()
        writer.close()
    # The trainer's stitcher, keeping no prompt rows, trains on every generated position of each
    # request, the K = 0 steps' included (they carry no drafts, yet are not prompt rows).
    stitcher = Stitcher(max_tokens=512, prompt_tokens=0)
    stitcher.add(back)
    stitcher.close_all()
    seqs = [s.tokens.tolist() for s, _ in stitcher.take()]
    assert len(seqs) == len(outs)
    for o in outs:  # a last step's rows past max_new_tokens are still the target's tokens: kept
        out_ids = o["output_ids"]
        assert any(s[: len(out_ids)] == out_ids and len(s) - len(out_ids) <= 4 for s in seqs), out_ids


def test_records_keep_only_the_last_prompt_positions_when_asked(model, ref_tokenizer, trained_head_dir):
    """Chunked prefill (chunks of 5) with record_prompt_tokens = 3: each request's prompt records
    cover exactly its last 3 prompt positions, the piece containing them included."""
    eng = _engine(model, ref_tokenizer, 4, draft_model_path=trained_head_dir)
    eng.record_prompt_tokens = 3
    records = []
    eng.record_sink = records.extend
    outs = eng.generate(PROMPTS[:4], SamplingParams(max_new_tokens=MAX_NEW))
    plens = {o["meta_info"]["id"]: o["meta_info"]["prompt_tokens"] for o in outs}
    for rid, plen in plens.items():
        positions = sorted(
            p
            for r in records
            if r.prefill and r.request_id == rid
            for p in range(r.position, r.position + r.num_accepted + 1)
        )
        assert positions == list(range(max(0, plen - 3), plen)), (rid, plen, positions)
