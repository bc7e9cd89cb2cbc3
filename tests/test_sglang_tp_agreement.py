"""Issue 13, defect 3: with TP >= 2 a rank that cannot swap must not stop the others.

Two real processes in a gloo group stand in for two TP ranks (SGLang agrees over its TP CPU group,
which is gloo). Each builds the plugin's Runtime over the same weight store (CPU here) with a
DraftSwapper into a small module laid out like SGLang's draft; the parent publishes as the trainer.
A rank whose runtime failed at init, or whose copy raises (on a GPU: "Event device does not match
recording stream's device"), must still join the swap's MIN all-reduce; then every rank keeps the
previous head and stops swapping, and nobody hangs."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from aurora_sgl.transport.weight_store import WeightStore

LAYOUT = {"fc.weight": ((4, 6), torch.float32), "lm_head.weight": ((5, 4), torch.float32), "d2t": ((5,), torch.int64)}


class _Draft(nn.Module):
    """Parameter names as in SGLang's LlamaForCausalLMEagle3 (`model.` prefix, lm_head apart)."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.fc = nn.Linear(6, 4, bias=False)
        self.lm_head = nn.Linear(4, 5, bias=False)


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "fc.weight": torch.randn(4, 6, generator=g),
        "lm_head.weight": torch.randn(5, 4, generator=g),
        "d2t": torch.full((5,), seed, dtype=torch.int64),
    }


class _NoStreams:
    """What `forward_stream_of` reads of SGLang's Scheduler: on CPU there is no stream."""

    enable_overlap, forward_stream, schedule_stream = True, None, None


def _rank(rank: int, port: int, spec: dict, fault: str | None, out) -> None:
    import torch.distributed as dist

    from aurora_sgl.sglang_backend import plugin
    from aurora_sgl.sglang_backend.swap import DraftSwapper

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    group = dist.group.WORLD
    store = WeightStore.attach(spec)
    try:
        if fault == "init" and rank == 1:
            rt = plugin.Runtime.broken_rank(group)  # what the __init__ hook leaves after an error
            model = hot = None
        else:
            model, hot = _Draft(), torch.arange(5)
            v1 = _state(1)
            with torch.no_grad():
                model.model.fc.weight.copy_(v1["fc.weight"])
                model.lm_head.weight.copy_(v1["lm_head.weight"])
                hot.add_(v1["d2t"])
            swapper = DraftSwapper(model, lambda: hot, store.names, store.layout)
            if fault == "copy" and rank == 1:

                def failing_swap(views):
                    raise RuntimeError("Event device does not match recording stream's device")

                swapper.swap = failing_swap
            rt = plugin.Runtime(
                staging=None,
                ring=None,
                store=store,
                swapper=swapper,
                leader=rank == 0,
                handoff_dir=None,
                tp_group=group,
            )
            rt.draft_version = 1
        # One scheduler iteration as SGLang runs it: TP rank 0 pulls (our hook appends the marker),
        # the list is broadcast pickled over the TP CPU group (SGLang's `broadcast_pyobj`; here
        # torch's, to spare each process the SGLang import), every rank's receive hook takes the
        # marker out, then the iteration hook swaps and agrees through `plugin.agree`.
        plugin.set_runtime(rt)
        pulled = [plugin._after_pull(["req"], None) if rank == 0 else None]
        dist.broadcast_object_list(pulled, src=0, group=group)
        received = plugin._after_recv(pulled[0], None)
        if received != ["req"] or rt.pending_version != 2:
            out.put((rank, {"error": f"marker lost: received {received}, armed {rt.pending_version}"}))
            return
        plugin._after_iteration(None, _NoStreams())
        result = {"version": rt.draft_version, "broken": rt.broken, "failed": rt.counters["failed_swaps"]}
        if model is not None:
            # by value: a tensor would go by file descriptor, lost if this process exits first
            result["fc"] = model.model.fc.weight.detach().numpy().copy()
            result["hot"] = hot.numpy().copy()
        out.put((rank, result))
    finally:
        store.close()
        dist.destroy_process_group()


def run_two_ranks(target, spec: dict, arg) -> dict[int, dict]:
    """`target(rank, port, spec, arg, out)` in two spawned processes joined in a gloo group; each
    puts (rank, result) on `out`. Returns {rank: result}; a result with "error" fails at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, port, spec, arg, out)) for r in (0, 1)]
    try:
        for p in procs:
            p.start()
        results = {}
        for _ in procs:
            rank, result = out.get(timeout=120)  # a rank left in the all-reduce: Empty
            assert "error" not in result, (rank, result["error"])  # not worth waiting for its peer
            results[rank] = result
        for p in procs:
            p.join(30)
        return results
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


def _run(fault: str | None) -> dict[int, dict]:
    store = WeightStore.create("test_tp_agree", LAYOUT)
    try:
        store.publish(_state(1))
        store.publish(_state(2))
        results = run_two_ranks(_rank, store.spec(), fault)
    finally:
        store.close()
    return {
        rank: {k: torch.from_numpy(v) if k in ("fc", "hot") else v for k, v in result.items()}
        for rank, result in results.items()
    }


def test_every_rank_swaps_when_every_copy_succeeds():
    r = _run(None)
    for rank in (0, 1):
        assert (r[rank]["version"], r[rank]["broken"]) == (2, False)
        assert torch.equal(r[rank]["fc"], _state(2)["fc.weight"])
        assert torch.equal(r[rank]["hot"], torch.arange(5) + 2)


@pytest.mark.parametrize("fault", ["init", "copy"])
def test_a_rank_that_cannot_swap_disables_swaps_everywhere_without_a_hang(fault):
    r = _run(fault)
    assert r[0] == {**r[0], "version": 1, "broken": True, "failed": 1}
    assert r[1]["broken"] and r[1]["version"] == (1 if fault == "copy" else 0)  # 0: it never had a head
    for rank in r:
        if "fc" in r[rank]:  # the previous head, on every rank that has one
            assert torch.equal(r[rank]["fc"], _state(1)["fc.weight"])
            assert torch.equal(r[rank]["hot"], torch.arange(5) + 1)


def test_only_the_store_owner_records_the_interprocess_event():
    from aurora_sgl.transport.weight_store import engine_event

    ipc = object()
    assert engine_event(True, ipc, object) == (ipc, False)
    local, host_wait = engine_event(False, ipc, object)
    assert local is not ipc and host_wait  # another rank: its own event, waited on before the gen check
