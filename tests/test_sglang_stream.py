"""Issue 13, item 6: the swap is queued on the stream SGLang runs the forwards on, with overlap
scheduling and with `--disable-overlap-schedule`.

CUDA streams cannot be made on this CPU, so the scheduler here is SGLang's own `Scheduler` class
(built without its GPU init) holding two distinct stand-ins; that the attribute names and the rule
are SGLang 0.5.23's is pinned against its source, so a rename or a changed rule fails here.
"""

from __future__ import annotations

import inspect
import re

import pytest

pytest.importorskip("sglang")

from sglang.srt.managers.scheduler import Scheduler  # noqa: E402

from aurora_sgl.sglang_backend import plugin  # noqa: E402


def _scheduler(enable_overlap: bool) -> Scheduler:
    s = Scheduler.__new__(Scheduler)  # the real class; its __init__ needs GPUs
    s.enable_overlap = enable_overlap
    s.forward_stream = "model_runner.forward_stream"
    s.schedule_stream = "scheduler.schedule_stream"
    return s


def test_swap_stream_is_forward_stream_with_overlap_and_schedule_stream_without():
    assert plugin.forward_stream_of(_scheduler(True)) == "model_runner.forward_stream"
    assert plugin.forward_stream_of(_scheduler(False)) == "scheduler.schedule_stream"


def _flat(fn) -> str:
    return re.sub(r"\s+", " ", inspect.getsource(fn))


def test_the_rule_and_the_names_are_sglangs():
    # overlap is on unless --disable-overlap-schedule (MLX aside)
    assert "self.enable_overlap = ( not get_schedule().disable_overlap_schedule" in _flat(Scheduler.__init__)
    # SGLang's own statement of which stream the forwards run on ("Match run_batch")
    assert (
        "model_runner.forward_stream if self.enable_overlap or get_parallel().pp_size > 1 or use_mlx() "
        "else self.schedule_stream" in _flat(Scheduler.init_model_worker)
    )
    # with overlap run_batch enters forward_stream; without it the event loop's stream is current
    assert "with self.forward_stream_ctx: self.forward_stream.wait_stream(self.schedule_stream)" in _flat(
        Scheduler.run_batch
    )
    assert re.search(
        r"with self\.device_module\.StreamContext\(self\.schedule_stream\):.*dispatch_event_loop\(self\)",
        _flat(Scheduler.run_event_loop),
    )
    # the hook runs after ingest_requests, once per event-loop iteration, in both loops
    assert plugin.HOOK_TARGETS["iteration"].endswith("Scheduler.ingest_requests")
    for loop in (Scheduler.event_loop_normal, Scheduler.event_loop_overlap):
        assert "self.ingest_requests()" in _flat(loop)
