"""Specs with CUDA IPC handles: JSON for what JSON can carry, a private pickle beside it for the rest."""

import json
import os
import stat

import pytest

from aurora_sgl.trainer.config import TrainerConfig
from aurora_sgl.transport.handoff import read_handoff, write_handoff


def test_cuda_handles_travel_in_a_private_pickle_beside_the_json(tmp_path):
    handle = (print, (b"\x00ipc-handle", 7))  # the shape of reduce_tensor's (rebuild fn, args)
    spec = {
        "ring": {"name": "r", "cuda_payload": handle, "cuda_event": b"\x01evt"},
        "store": {"name": "s", "cuda_buffers": handle, "cuda_events": [b"a", b"b"]},
        "threads": 1,
    }
    path = tmp_path / "spec.json"
    write_handoff(spec, str(path))
    plain = json.loads(path.read_text())
    assert plain == {"ring": {"name": "r"}, "store": {"name": "s"}, "threads": 1, "cuda_handles": "spec.json.cuda.pkl"}
    for f in (path, tmp_path / "spec.json.cuda.pkl"):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    assert read_handoff(str(path)) == spec


def test_plain_specs_stay_plain_json_and_foreign_pickles_are_refused(tmp_path):
    path = tmp_path / "spec.json"
    write_handoff({"ring": {"name": "r"}}, str(path))
    assert not (tmp_path / "spec.json.cuda.pkl").exists()
    assert read_handoff(str(path)) == {"ring": {"name": "r"}}
    path.write_text(json.dumps({"cuda_handles": "../elsewhere.pkl"}))
    with pytest.raises(ValueError, match="beside the spec"):
        read_handoff(str(path))
    (tmp_path / "x.pkl").write_bytes(b"")
    os.chmod(tmp_path / "x.pkl", 0o666)
    path.write_text(json.dumps({"cuda_handles": "x.pkl"}))
    with pytest.raises(ValueError, match="writable"):
        read_handoff(str(path))


def test_sglang_handoff_becomes_a_trainer_spec_the_real_trainer_attaches_to(tmp_path):
    """The contract between the plugin's handoff (written by the scheduler that owns the ring and
    the store) and the trainer the launcher starts from it, on CPU segments."""
    import argparse
    import threading

    import torch

    from aurora_sgl import reference_head_path, reference_model_path
    from aurora_sgl.engine.draft_head import Eagle3Head
    from aurora_sgl.sglang_backend.launcher import TrainerSidecar
    from aurora_sgl.trainer.loop import Trainer
    from aurora_sgl.transport.signal_ring import SignalRing
    from aurora_sgl.transport.weight_store import WeightStore, layout_of

    head = Eagle3Head.load(reference_head_path(), torch.zeros(0))
    aux = head.config.aux_layer_ids
    ring = SignalRing.create("test_handoff_ring", 8, 6, 3 * head.config.hidden_size, head.config.hidden_size, 5)
    store = WeightStore.create("test_handoff_store", layout_of(head.serving_state()))
    store.publish(head.serving_state())
    write_handoff(
        {
            "ring": ring.spec(),
            "store": store.spec(),
            "model_path": reference_model_path(),
            "draft_path": reference_head_path(),
            "aux_layer_ids": aux,
            "draft_vocab_size": head.config.draft_vocab_size,
        },
        str(tmp_path / "handoff.json"),
    )
    args = argparse.Namespace(train_objective="kl", train_lr=None, checkpoint_dir=None, trainer_device="cpu")
    sidecar = TrainerSidecar(str(tmp_path), args, pretrained=True)
    sidecar.handoff = read_handoff(str(tmp_path / "handoff.json"))
    spec = sidecar.trainer_spec()
    assert spec.parent_pid == os.getpid() and spec.init_head == reference_head_path()
    assert spec.ring_dir == str(tmp_path)  # where the other DP replicas' rings appear
    trainer = Trainer(spec, threading.Event(), parent_pid=os.getppid())  # in-process: our parent is not us
    try:
        trainer.setup()
        assert trainer.counters["last_published_version"] == 1
        assert trainer.lr == TrainerConfig().resolved_lr(pretrained=True)  # the fine-tuning rate
        for name, t in head.serving_state().items():
            assert torch.equal(trainer.head.serving_state()[name], t), name
    finally:
        trainer.close()
        sidecar.status.close()
        ring.close()
        store.close()


def test_sglang_sidecar_reports_every_replicas_counters_and_unlinks_replica_rings(tmp_path):
    import argparse

    from aurora_sgl.sglang_backend.launcher import TrainerSidecar
    from aurora_sgl.transport.ring_set import replica_ring_file
    from aurora_sgl.transport.segments import SHM_DIR
    from aurora_sgl.transport.signal_ring import SignalRing

    ring = SignalRing.create("aurora_ring_dp1", 4, 2, 3, 1, 1)
    shm = os.path.join(SHM_DIR, ring.name)
    try:
        write_handoff({"ring": ring.spec(), "dp_rank": 1}, str(tmp_path / replica_ring_file(1)))
        for dp, written in ((0, 5), (1, 7)):
            (tmp_path / f"counters_dp{dp}_rank0.json").write_text(json.dumps({"records_written": written}))
        (tmp_path / "counters_dp1_rank1.json").write_text(json.dumps({"records_written": 0}))
        args = argparse.Namespace(train_objective="kl", train_lr=None, checkpoint_dir=None, trainer_device="cpu")
        sidecar = TrainerSidecar(str(tmp_path), args, pretrained=True)
        assert sidecar.counters() == {
            "dp0_rank0": {"records_written": 5},
            "dp1_rank0": {"records_written": 7},
            "dp1_rank1": {"records_written": 0},
        }
        assert os.path.exists(shm)
        sidecar.close()  # the replica's scheduler may have been killed: its ring goes too
        assert not os.path.exists(shm) and not tmp_path.exists()
    finally:
        ring.close()
