"""The trainer's reader over one ring per SGLang data-parallel replica: rings that appear later are
attached, every record of every ring is read in its ring's order, stats add up, and the stitcher
keeps each request whole however the rings' records interleave."""

import torch

from aurora_sgl.records import StepRecord
from aurora_sgl.trainer.stitcher import Stitcher
from aurora_sgl.transport.handoff import write_handoff
from aurora_sgl.transport.ring_set import RingSet, replica_ring_file
from aurora_sgl.transport.signal_ring import SignalRing

K, T, A, H = 3, 4, 6, 2


def _record(rid: str, position: int, accepted: int = 1) -> StepRecord:
    """A decode record of request `rid` covering position .. position + accepted (tokens 100 + p)."""
    rows = torch.arange(position, position + accepted + 1)
    outcome = torch.tensor([1 if j < accepted else 0 if j == accepted else -1 for j in range(K)], dtype=torch.int8)
    return StepRecord(
        request_id=rid,
        position=position,
        draft_tokens=torch.zeros(K, dtype=torch.long),
        target_tokens=torch.zeros(K, dtype=torch.long),
        outcome=outcome,
        num_accepted=accepted,
        committed=[],
        input_tokens=100 + rows,
        next_tokens=101 + rows,
        aux_hidden=rows.float().unsqueeze(1).expand(-1, A).clone(),
        final_hidden=rows.float().unsqueeze(1).expand(-1, H).clone(),
        draft_version=1,
    )


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _ring(name: str, capacity: int = 64) -> SignalRing:
    return SignalRing.create(name, capacity, T, A, H, K)


def test_reads_every_record_of_a_ring_that_appears_later_in_ring_order(tmp_path):
    first, second = _ring("test_rs_dp0"), _ring("test_rs_dp1")
    clock = Clock()
    rs = RingSet(SignalRing.attach(first.spec()), str(tmp_path), poll_s=1.0, clock=clock)
    try:
        first.write_many([_record(f"a{i}", 10 * i) for i in range(5)])
        got = rs.read(3)
        assert [r.request_id for r in got] == ["a0", "a1", "a2"] and {r.source for r in got} == {0}
        # Replica 1 hands its ring over after the trainer started.
        write_handoff({"ring": second.spec(), "dp_rank": 1}, str(tmp_path / replica_ring_file(1)))
        second.write_many([_record(f"b{i}", 10 * i) for i in range(6)])
        first.write_many([_record(f"a{i}", 10 * i) for i in range(5, 8)])
        clock.now = 0.5  # within poll_s of the last listing: not looked for yet
        got += rs.read(2)
        assert rs.stats()["rings"] == 1 and [r.request_id for r in got[3:]] == ["a3", "a4"]
        clock.now = 1.5
        batch = rs.read(4)  # an equal share of each ring
        assert sorted(r.source for r in batch) == [0, 0, 1, 1], batch
        got += batch
        while batch := rs.read(4):
            got += batch
        second.write_many([_record(f"b{i}", 10 * i) for i in range(6, 9)])
        got += rs.read(100)
        stats = rs.stats()
    finally:
        rs.close()
    by_ring = {s: [r for r in got if r.source == s] for s in (0, 1)}
    assert [r.request_id for r in by_ring[0]] == [f"a{i}" for i in range(8)]
    assert [r.request_id for r in by_ring[1]] == [f"b{i}" for i in range(9)]
    for records in by_ring.values():  # each ring's own sequence numbers, in order
        assert [r.seq for r in records] == list(range(len(records)))
        for r in records:
            assert r.input_tokens.tolist() == [100 + r.position, 101 + r.position]
    assert stats == {"written": 8 + 9, "drops": 0, "truncated": 0, "rings": 2}
    first.close()
    second.close()


def test_a_ring_that_is_gone_is_skipped_once_and_the_primary_is_not_attached_twice(tmp_path, caplog):
    first, gone = _ring("test_rs_dp0"), _ring("test_rs_gone")
    write_handoff({"ring": gone.spec()}, str(tmp_path / replica_ring_file(2)))
    write_handoff({"ring": first.spec()}, str(tmp_path / replica_ring_file(3)))  # the primary's own spec
    gone.close()  # its replica exited: the segment is unlinked
    clock = Clock()
    rs = RingSet(SignalRing.attach(first.spec()), str(tmp_path), poll_s=1.0, clock=clock)
    try:
        first.write_many([_record("a", 0)])
        assert [r.request_id for r in rs.read(8)] == ["a"]
        assert rs.stats()["rings"] == 1 and "cannot attach" in caplog.text
        caplog.clear()
        clock.now = 5.0
        assert rs.read(8) == [] and "cannot attach" not in caplog.text  # tried once
    finally:
        rs.close()
        first.close()


def test_requests_of_two_rings_stay_whole_however_reads_interleave(tmp_path):
    # Sequence numbers are per ring: replica 0's ring is far ahead of replica 1's. The stitcher
    # closes a request that missed more than ~2 batches of records; comparing one ring's numbers
    # with the other's would close replica 1's requests at every record.
    first, second = _ring("test_rs_dp0", capacity=256), _ring("test_rs_dp1", capacity=256)
    rs = RingSet(SignalRing.attach(first.spec()), str(tmp_path), poll_s=0.0)
    write_handoff({"ring": second.spec()}, str(tmp_path / replica_ring_file(1)))
    st = Stitcher(max_tokens=512)
    try:
        first.write_many([_record("old", 2 * i) for i in range(200)])
        st.add(rs.read(256))
        st.close_all()
        st.take()
        steps = 12
        for step in range(steps):  # both replicas decode two requests each, one record per step
            first.write_many([_record(rid, 2 * step) for rid in ("a0", "a1")])
            second.write_many([_record(rid, 2 * step) for rid in ("b0", "b1")])
            if step % 3 == 2:  # the trainer reads now and then, a few records at a time
                while batch := rs.read(3):
                    st.add(batch)
        while batch := rs.read(3):
            st.add(batch)
        st.close_all()
        seqs = [s for s, _ in st.take()]
    finally:
        rs.close()
        first.close()
        second.close()
    assert len(seqs) == 4, [len(s.tokens) for s in seqs]
    for s in seqs:  # positions 0 .. 2 * steps - 1 and the last next token
        assert s.tokens.tolist() == [100 + p for p in range(2 * steps + 1)]
