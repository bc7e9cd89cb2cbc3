"""Prompt (prefill) capture of the SGLang backend against the real sglang==0.5.23 classes, on CPU.

The hook wraps `EAGLEWorkerV2._forward_prefill_batch`. Its target forward cannot run here, so the
wrapped function below is the part of the real one the hook depends on: it returns SGLang's
`GenerationBatchResult` with FULL-capture hidden states and runs SGLang's own
`EagleDraftWorker._draft_extend_for_prefill` up to the draft forward -- the code that rewrites
`batch.input_ids` into the shifted draft inputs (tail token: first sampled token, or the next
prompt token for an unfinished chunked request). The draft forward itself is cut off there.
"""

from __future__ import annotations

import pytest
import torch

sglang = pytest.importorskip("sglang")

from sglang.srt.layers.logits_processor import LogitsProcessorOutput  # noqa: E402
from sglang.srt.managers.schedule_batch import Req, ScheduleBatch  # noqa: E402
from sglang.srt.managers.utils import GenerationBatchResult  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardMode  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402
from sglang.srt.speculative.eagle_info import EagleVerifyInput  # noqa: E402
from sglang.srt.speculative.eagle_worker_v2 import EagleDraftWorker, EAGLEWorkerV2  # noqa: E402
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm  # noqa: E402

from aurora_sgl.sglang_backend import plugin  # noqa: E402
from aurora_sgl.sglang_backend.capture import CaptureStaging, Sequencer  # noqa: E402
from aurora_sgl.sglang_backend.prefill import PrefillStaging, keep_plan  # noqa: E402
from aurora_sgl.trainer.stitcher import Stitcher  # noqa: E402
from aurora_sgl.transport.signal_ring import SignalRing  # noqa: E402
from helpers import non_view_ops  # noqa: E402

H, A, K = 8, 24, 3  # hidden, aux (3H), draft steps: ring records hold K + 1 rows


class _DraftForwardReached(Exception):
    pass


class _NoDraftRunner:
    def __getattr__(self, name):
        raise _DraftForwardReached(name)


def _real_prefill(result):
    """`_forward_prefill_batch` minus the forwards: the target's outputs are `result`; the draft
    extend is SGLang's own code up to its forward."""
    dw = EagleDraftWorker.__new__(EagleDraftWorker)
    dw.speculative_algorithm = SpeculativeAlgorithm.EAGLE3
    dw.draft_runner = _NoDraftRunner()

    def run(worker, batch):
        try:
            dw._draft_extend_for_prefill(batch, result.logits_output.hidden_states, result.next_token_ids)
        except _DraftForwardReached:
            pass
        return result

    return run


def _prefill_batch(parts, seed, chunked=None):
    """parts: (rid, prompt, prefix_len, extend_len); `chunked` names the unfinished chunked request.
    Returns the batch, the result, and per request the rows the ring must receive."""
    g = torch.Generator().manual_seed(seed)
    reqs = [Req(rid, "", prompt, SamplingParams(max_new_tokens=8)) for rid, prompt, _, _ in parts]
    ids = torch.cat([torch.tensor(p[s : s + n]) for _, p, s, n in parts])
    total = ids.numel()
    aux, final = torch.randn(total, A, generator=g), torch.randn(total, H, generator=g)
    sampled = torch.randint(500, 600, (len(parts),), generator=g)
    chunked_req = next((r for r in reqs if r.rid == chunked), None)
    batch = ScheduleBatch(
        reqs=reqs,
        device="cpu",
        forward_mode=ForwardMode.EXTEND,
        input_ids=ids,
        prefix_lens=[s for _, _, s, _ in parts],
        extend_lens=[n for *_, n in parts],
        chunked_req=chunked_req,
        seq_lens=torch.tensor([s + n for _, _, s, n in parts]),
    )
    if chunked_req is not None:
        _, p, s, n = next(x for x in parts if x[0] == chunked)
        batch.chunked_req_next_prompt_token = p[s + n]
    result = GenerationBatchResult(
        logits_output=LogitsProcessorOutput(next_token_logits=None, hidden_states=aux, last_hidden_states=final),
        next_token_ids=sampled,
    )
    expected, at = {}, 0
    for i, (rid, p, s, n) in enumerate(parts):
        tail = p[s + n] if rid == chunked else int(sampled[i])
        expected[rid] = {
            "positions": list(range(s, s + n)),
            "input": p[s : s + n],
            "next": p[s + 1 : s + n] + [tail],
            "aux": aux[at : at + n],
            "final": final[at : at + n],
        }
        at += n
    return batch, result, expected


def _runtime(ring, prefill_rows=64):
    order = Sequencer()
    staging = CaptureStaging(8, K, A, H, sequencer=order)
    prefill = PrefillStaging(prefill_rows, K, A, H, sequencer=order)
    return plugin.Runtime(
        staging=staging, ring=ring, store=None, swapper=None, leader=True, handoff_dir=None, prefill=prefill
    )


def _joined(recs, rid):
    """A request's rows from ring records, checked contiguous."""
    mine = [r for r in recs if r.request_id == rid]
    pos = [p for r in mine for p in range(r.position, r.position + r.input_tokens.numel())]
    return {
        "positions": pos,
        "input": torch.cat([r.input_tokens for r in mine]).tolist(),
        "next": torch.cat([r.next_tokens for r in mine]).tolist(),
        "aux": torch.cat([r.aux_hidden for r in mine]),
        "final": torch.cat([r.final_hidden for r in mine]),
        "rows": [r.input_tokens.numel() for r in mine],
    }


def test_prefill_hook_records_exactly_the_computed_prompt_rows():
    prompt_a = list(range(100, 109))  # 9 tokens, no cache hit
    prompt_b = list(range(200, 212))  # 12 tokens, 5 of them a prefix-cache hit: only 7 computed
    prompt_c = list(range(300, 320))  # 20 tokens, chunked: 8 now, 12 in the next iteration
    ring = SignalRing.create("test_sgl_prefill", 64, K + 1, A, H, K)
    reader = SignalRing.attach(ring.spec())
    rt = _runtime(ring)
    plugin.set_runtime(rt)
    try:
        batch, result, want = _prefill_batch(
            [("a", prompt_a, 0, 9), ("b", prompt_b, 5, 7), ("c", prompt_c, 0, 8)], seed=1, chunked="c"
        )
        worker = EAGLEWorkerV2.__new__(EAGLEWorkerV2)
        assert plugin._around_prefill(_real_prefill(result), worker, batch) is result
        assert reader.read(64) == []  # nothing reaches the ring inside the step
        rt.iteration()
        first = reader.read(64)
        batch2, result2, want2 = _prefill_batch([("c", prompt_c, 8, 12)], seed=2)
        plugin._around_prefill(_real_prefill(result2), worker, batch2)
        rt.iteration()
        second = reader.read(64)
        stats = rt.stats()
    finally:
        plugin.set_runtime(None)
        reader.close()
        ring.close()
    assert all(r.outcome.tolist() == [-1] * K and r.draft_tokens.tolist() == [-1] * K for r in first + second)
    for rid in ("a", "b", "c"):
        got, exp = _joined(first, rid), want[rid]
        assert max(got["rows"]) <= K + 1
        assert got["positions"] == exp["positions"]
        assert got["input"] == exp["input"] and got["next"] == exp["next"]
        assert torch.equal(got["aux"], exp["aux"]) and torch.equal(got["final"], exp["final"])
    got = _joined(second, "c")
    assert got["positions"] == list(range(8, 20)) and got["input"] == prompt_c[8:]
    assert got["next"] == want2["c"]["next"] and torch.equal(got["aux"], want2["c"]["aux"])
    assert stats["records_written"] == len(first) + len(second) == 3 + 2 + 2 + 3
    assert stats["prefill_rows_dropped"] == 0


def test_prefill_and_decode_records_of_one_request_stitch_into_one_sequence():
    """Prompt rows, then a verify step through the verify hook: the Stitcher must see one request
    whose positions run on without a gap (the verify root sits at seq_lens = the prompt length)."""
    prompt = list(range(10, 19))  # 9 tokens
    ring = SignalRing.create("test_sgl_stitch", 64, K + 1, A, H, K)
    reader = SignalRing.attach(ring.spec())
    rt = _runtime(ring)
    plugin.set_runtime(rt)
    try:
        batch, result, want = _prefill_batch([("r", prompt, 0, 9)], seed=3)
        worker = EAGLEWorkerV2.__new__(EAGLEWorkerV2)
        worker.topk, worker.speculative_num_steps, worker.speculative_num_draft_tokens = 1, K, K + 1
        plugin._around_prefill(_real_prefill(result), worker, batch)
        first = int(want["r"]["next"][-1])  # the sampled token: the first verify's root
        # verify: root + 3 drafts, 2 accepted; the target's tokens at the 4 verified positions
        draft = torch.tensor([first, 40, 41, 99])
        predict = torch.tensor([40, 41, 42, 43])
        seq_lens = torch.tensor([9])
        verify = EagleVerifyInput(
            draft_token=draft,
            custom_mask=None,
            positions=None,
            retrieve_index=None,
            retrieve_next_token=None,
            retrieve_next_sibling=None,
            retrieve_cum_len=None,
            spec_steps=K,
            topk=1,
            draft_token_num=K + 1,
            capture_hidden_mode=CaptureHiddenMode.FULL,
            seq_lens_sum=9,
            seq_lens_cpu=seq_lens,
        )
        # no host mirror (SGLang's mirrorless overlap mode): the position comes from the device seq_lens
        vbatch = ScheduleBatch(
            reqs=batch.reqs,
            device="cpu",
            forward_mode=ForwardMode.TARGET_VERIFY,
            seq_lens=seq_lens,
            seq_lens_cpu=None,
            spec_info=verify,
        )
        vres = GenerationBatchResult(
            logits_output=LogitsProcessorOutput(
                next_token_logits=None, hidden_states=torch.randn(K + 1, A), last_hidden_states=torch.randn(K + 1, H)
            ),
            next_token_ids=predict,
            accept_lens=torch.tensor([3]),
            accept_index=torch.tensor([[0, 1, 2, -1]]),
            speculative_num_draft_tokens=K + 1,
        )
        plugin._around_verify(lambda w, b: vres, worker, vbatch)
        rt.iteration()  # both slots drain in step order: prompt first
        recs = reader.read(64)
    finally:
        plugin.set_runtime(None)
        reader.close()
        ring.close()
    assert [r.position for r in recs] == [0, 4, 8, 9]
    st = Stitcher(max_tokens=512)
    st.add(recs)
    st.close_all()
    seqs = st.take()
    assert len(seqs) == 1
    seq, _ = seqs[0]
    # prompt, the sampled token, the two accepted drafts, then the target's bonus token
    assert seq.tokens.tolist() == prompt + [first, 40, 41, 42]
    assert torch.equal(seq.aux[:9], want["r"]["aux"])


def test_prefill_staging_keeps_the_trailing_rows_when_full():
    assert keep_plan([5, 7, 3], 9) == [5, 4, 0]
    staging = PrefillStaging(6, K, A, H)
    from aurora_sgl.sglang_backend.prefill import PrefillStep

    ids = torch.arange(10)
    aux, final = torch.randn(10, A), torch.randn(10, H)
    step = PrefillStep(["x", "y"], [0, 20], [4, 6], ids, ids + 1, aux, final)
    assert staging.capture(step)
    recs = staging.records(staging.ready_slots()[0])
    assert staging.rows_dropped == 4
    x = [r for r in recs if r.request_id == "x"]
    y = [r for r in recs if r.request_id == "y"]
    assert [r.position for r in x] == [0] and x[0].input_tokens.tolist() == [0, 1, 2, 3]
    # y keeps its last 2 rows (absolute positions 24, 25), the ones next to its decode records
    assert [r.position for r in y] == [24] and y[0].input_tokens.tolist() == [8, 9]
    assert torch.equal(y[0].aux_hidden, aux[8:10])


def _verify_step(bs: int, seed: int):
    from aurora_sgl.sglang_backend.capture import VerifyStep

    g = torch.Generator().manual_seed(seed)
    d = s = K + 1
    accept_lens = torch.randint(1, s + 1, (bs,), generator=g)
    accept_index = torch.where(
        torch.arange(s) < accept_lens.unsqueeze(1), torch.arange(bs).unsqueeze(1) * d + torch.arange(s), -1
    )
    return VerifyStep(
        request_ids=[f"r{i}" for i in range(bs)],
        positions=list(range(100, 100 + bs)),
        root_tokens=torch.randint(0, 100, (bs,), generator=g),
        draft_tokens=torch.randint(0, 100, (bs * d,), generator=g),
        predict=torch.randint(0, 100, (bs * d,), generator=g),
        accept_lens=accept_lens,
        accept_index=accept_index,
        aux_hidden=torch.randn(bs * d, A, generator=g),
        final_hidden=torch.randn(bs * d, H, generator=g),
        topk=1,
        seq_lens=torch.arange(100, 100 + bs),
    )


def test_drain_work_is_per_field_not_per_request(monkeypatch):
    """Draining a verify slot of 48 requests (and a prefill slot of 48 prompts) runs the same tensor
    operations as one of 8, and one slot copy per field into the ring; the rows are the staged ones."""
    from aurora_sgl.sglang_backend.capture import drain_in_order
    from aurora_sgl.sglang_backend.prefill import PrefillStep
    from aurora_sgl.transport import signal_ring

    copies = []
    real = signal_ring._copy_into
    monkeypatch.setattr(signal_ring, "_copy_into", lambda d, s: (copies.append(1), real(d, s)))
    ring = SignalRing.create("test_sgl_count", 512, K + 1, A, H, K)
    reader = SignalRing.attach(ring.spec())
    try:
        verify_ops, prefill_ops = {}, {}
        for bs in (8, 48):
            staging = CaptureStaging(64, K, A, H)
            step = _verify_step(bs, seed=bs)
            assert staging.capture(step)
            copies.clear()
            verify_ops[bs] = non_view_ops(lambda st=staging: drain_in_order([st], ring))
            assert len(copies) == 7
            got = reader.read(1000)
            assert [g.request_id for g in got] == step.request_ids
            pred = step.predict.view(bs, K + 1)
            for i, g in enumerate(got):
                n = int(step.accept_lens[i])
                assert g.num_accepted == n - 1 and g.position == 100 + i
                assert torch.equal(g.next_tokens, pred[i, :n])
                reached = pred[i, : min(n, K)].tolist()
                assert g.target_tokens.tolist() == reached + [-1] * (K - len(reached))
                assert g.outcome.tolist() == ([1] * (n - 1) + [0] + [-1] * K)[:K]
                assert torch.equal(g.aux_hidden, step.aux_hidden.view(bs, K + 1, A)[i, :n])
                assert torch.equal(g.final_hidden, step.final_hidden.view(bs, K + 1, H)[i, :n])

            prefill = PrefillStaging(4096, K, A, H)
            lengths = [1 + (7 * i) % 11 for i in range(bs)]  # 1..11 rows: 1 to 3 pieces of K+1 rows
            total = sum(lengths)
            ids = torch.arange(total)
            aux, final = torch.randn(total, A), torch.randn(total, H)
            starts = [10 * i for i in range(bs)]
            assert prefill.capture(PrefillStep([f"p{i}" for i in range(bs)], starts, lengths, ids, ids + 1, aux, final))
            copies.clear()
            prefill_ops[bs] = non_view_ops(lambda st=prefill: drain_in_order([st], ring))
            assert len(copies) == 7
            got = reader.read(1000)
            at = 0
            for i, n in enumerate(lengths):
                mine = [g for g in got if g.request_id == f"p{i}"]
                assert [g.position for g in mine] == list(range(starts[i], starts[i] + n, K + 1))
                assert torch.cat([g.input_tokens for g in mine]).tolist() == list(range(at, at + n))
                assert torch.equal(torch.cat([g.aux_hidden for g in mine]), aux[at : at + n])
                assert all((g.draft_tokens == -1).all() and (g.outcome == -1).all() for g in mine)
                at += n
        assert verify_ops[48] == verify_ops[8] <= 24  # 7 slot copies + the masks
        assert prefill_ops[48] == prefill_ops[8] <= 24  # 7 slot copies + 4 gathers
    finally:
        reader.close()
        ring.close()
