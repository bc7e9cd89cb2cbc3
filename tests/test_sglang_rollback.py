"""Issue 13, parity: the SGLang plugin rolls back a draft version that serves worse, with the same
policy as the embedded engine (online/rollback.py), on every TP rank at once.

The accept lengths come from SGLang's output processor (`_resolve_spec_v2_tokens`, our after-hook
`_after_accepted`), tagged at verify time with the version that drafted them; the leader's policy
decides, and its decision rides the request broadcast to every rank as a marker, like a swap."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from aurora_sgl.online.rollback import RollbackPolicy
from aurora_sgl.sglang_backend import plugin
from aurora_sgl.transport.weight_store import WeightStore
from test_sglang_tp_agreement import LAYOUT, _Draft, _NoStreams, _state, run_two_ranks

K = 3
_DECODE = SimpleNamespace(is_idle=lambda: False)


def _serve(n: int, accepted: int, rid: str, worker) -> None:
    """n decode steps of one request as the plugin sees them: the verify hook tags SGLang's result
    with the serving version, the output processor's after-hook hands over the accept lengths."""
    for _ in range(n):
        batch = SimpleNamespace(reqs=[SimpleNamespace(rid=rid)], forward_mode=_DECODE)
        result = SimpleNamespace(num_correct_drafts_per_req_cpu=[accepted])
        plugin._around_verify(lambda w, b, r=result: r, worker, batch)
        plugin._after_accepted(None, None, result, batch)


def _rank(rank: int, port: int, spec: dict, suspect_on_new_traffic: int, out) -> None:
    import torch.distributed as dist

    from aurora_sgl.sglang_backend.swap import DraftSwapper

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    group = dist.group.WORLD
    store = WeightStore.attach(spec)
    try:
        model, hot = _Draft(), torch.arange(5)
        with torch.no_grad():
            model.model.fc.weight.copy_(_state(1)["fc.weight"])
            model.lm_head.weight.copy_(_state(1)["lm_head.weight"])
            hot.add_(_state(1)["d2t"])
        swapper = DraftSwapper(model, lambda: hot, store.names, store.layout)
        policy = RollbackPolicy(K, 1, window=4, margin=0.2) if rank == 0 else None
        rt = plugin.Runtime(
            staging=None,
            ring=None,
            store=store,
            swapper=swapper,
            leader=rank == 0,
            handoff_dir=None,
            tp_group=group,
            rollback=True,
            policy=policy,
        )
        rt.draft_version = rt.confirmed_version = 1
        plugin.set_runtime(rt)
        worker = SimpleNamespace(speculative_num_steps=K)
        seen = {}

        def iteration(name):
            pulled = [plugin._after_pull(["req"], None) if rank == 0 else None]
            dist.broadcast_object_list(pulled, src=0, group=group)
            plugin._after_recv(pulled[0], None)
            plugin._after_iteration(None, _NoStreams())
            seen[name] = (rt.draft_version, int(model.model.fc.weight[0, 0] == _state(2)["fc.weight"][0, 0]))
            seen[name + "_hot"] = int(hot[0])

        if rank == 0:
            _serve(4, K, "a", worker)  # version 1 drafts tau 4
            store.publish(_state(2))  # the trainer publishes version 2
        iteration("swap")
        if rank == 0:
            _serve(4, 1, "a", worker)  # version 2 drafts tau 2 on request a
        iteration("probe")  # version 1 is re-measured
        if rank == 0:
            _serve(8, 0, "a", worker)  # a holds version 2's draft KV: not evidence either way
            _serve(4, suspect_on_new_traffic - 1, "b", worker)
        iteration("verdict")
        iteration("after")  # a rolled-back version is not swapped in again
        out.put(
            (
                rank,
                {
                    **seen,
                    "confirmed": rt.confirmed_version,
                    "broken": rt.broken,
                    "last_rollback": store.last_rollback(),
                    "counters": dict(rt.counters),
                },
            )
        )
    except Exception as e:  # reported, not left for the other rank to wait on
        out.put((rank, {"error": repr(e)}))
    finally:
        plugin.set_runtime(None)
        store.close()
        dist.destroy_process_group()


def _run(suspect_on_new_traffic: int) -> dict[int, dict]:
    store = WeightStore.create("test_sgl_rollback", LAYOUT)
    try:
        store.publish(_state(1))
        return run_two_ranks(_rank, store.spec(), suspect_on_new_traffic)
    finally:
        store.close()


@pytest.mark.parametrize("version_1_on_new_traffic,kept", [(4, False), (2, True)], ids=["rolled_back", "kept"])
def test_a_worse_version_is_probed_then_rolled_back_or_kept_on_every_rank(version_1_on_new_traffic, kept):
    """Version 2 drafts tau 2 where version 1 drafted 4: every rank serves version 1 again for one
    window (weights and hot map); if version 1 still drafts 4 on the new requests, version 2 is
    rolled back (the trainer told, never swapped in again); if it drafts 2, the traffic changed,
    not the weights, and every rank serves version 2 again, now confirmed."""
    r = _run(version_1_on_new_traffic)
    for rank in (0, 1):
        assert r[rank]["swap"] == (2, 1) and r[rank]["swap_hot"] == 2, (rank, r[rank])
        assert r[rank]["probe"] == (1, 0) and r[rank]["probe_hot"] == 1, (rank, r[rank])
        want = (2, 1) if kept else (1, 0)
        assert r[rank]["verdict"] == r[rank]["after"] == want, (rank, r[rank])
        assert r[rank]["after_hot"] == want[0]
        assert r[rank]["confirmed"] == want[0] and not r[rank]["broken"]
    assert r[0]["last_rollback"] == (0 if kept else 2)
    assert r[0]["counters"]["probes"] == 1 and r[0]["counters"]["rollbacks"] == (0 if kept else 1)
    assert r[0]["counters"]["swaps"] == r[1]["counters"]["swaps"] == 1


def test_accept_lengths_reach_the_judge_through_sglangs_output_processor():
    """SGLang's own `_resolve_spec_v2_tokens`, hooked by SGLang's HookRegistry, on a result tagged
    by our verify hook: the policy sees each request's accepted drafts under the drafting version."""
    from sglang.srt.managers.scheduler_components.batch_result_processor import SchedulerBatchResultProcessor
    from sglang.srt.managers.utils import GenerationBatchResult

    from test_sglang_backend import _hooks_applied_by_sglang

    class _Req(SimpleNamespace):
        def finished(self):
            return False

        def update_spec_correct_drafts_histogram(self, n):
            self.histogram.append(n)

    def req(rid):
        return _Req(
            rid=rid,
            is_retracted=False,
            grammar=None,
            kv=SimpleNamespace(kv_committed_len=0),
            spec_verify_ct=0,
            spec_num_correct_drafts=0,
            histogram=[],
        )

    processor = object.__new__(SchedulerBatchResultProcessor)  # frozen, slotted: set as SGLang would
    object.__setattr__(processor, "metrics_reporter", SimpleNamespace(snapshot_spec_decode_metrics=lambda b, r: None))
    object.__setattr__(processor, "model_worker", SimpleNamespace(on_verify_complete_cpu=lambda n, batch_size: None))
    batch = SimpleNamespace(reqs=[req("x"), req("y")], forward_mode=_DECODE, has_grammar=False)
    policy = RollbackPolicy(K, 1, window=2)
    rt = plugin.Runtime(
        staging=None, ring=None, store=None, swapper=object(), leader=True, handoff_dir=None, keep_previous=False
    )
    rt.rollback, rt.policy, rt.draft_version = True, policy, 7
    plugin.set_runtime(rt)
    try:
        with _hooks_applied_by_sglang():
            result = GenerationBatchResult(
                next_token_ids=torch.tensor([5, 6, 7, 0, 8, 0, 0, 0]),  # x took 2 drafts + bonus, y none
                accept_lens=torch.tensor([3, 1]),
                speculative_num_draft_tokens=K + 1,
            )
            plugin._around_verify(lambda w, b: result, SimpleNamespace(speculative_num_steps=K), batch)
            tokens = processor._resolve_spec_v2_tokens(result, batch)
        assert tokens == [[5, 6, 7], [8]]  # SGLang's own work, unchanged
        assert [r.spec_num_correct_drafts for r in batch.reqs] == [2, 0]
        assert list(policy._taus[7]) == [(K, 2), (K, 0)]  # version 7 drafted K, x took 2, y 0
        assert rt.running == {"x", "y"}
    finally:
        plugin.set_runtime(None)
