"""Trainer sidecar: stitching, simulated accept length, status segment, checkpoints, and the live
loop against a real engine -> signal ring -> trainer -> weight store path (tiny random Llama)."""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from aurora_sgl.engine.draft_head import Eagle3Head
from aurora_sgl.engine.engine import Engine
from aurora_sgl.engine.sampling import SamplingParams
from aurora_sgl.engine.unroll import simulated_tau_per_start, ttt_logits
from aurora_sgl.trainer.checkpoints import newest_checkpoint, save_checkpoint
from aurora_sgl.trainer.config import TrainerConfig
from aurora_sgl.trainer.guardrail import mean_of_sums, simulated_tau_sums
from aurora_sgl.trainer.loop import Trainer
from aurora_sgl.trainer.spec import TrainerSpec
from aurora_sgl.trainer.stitcher import CUT_CONTEXT, Stitcher
from aurora_sgl.training.batches import HeadBatch, Sequence
from aurora_sgl.training.offline import train_head_offline
from aurora_sgl.transport.handoff import write_handoff
from aurora_sgl.transport.ring_set import replica_ring_file
from aurora_sgl.transport.segments import SHM_DIR
from aurora_sgl.transport.signal_ring import RingRecord, SignalRing
from aurora_sgl.transport.trainer_status import TrainerStatus
from aurora_sgl.transport.weight_store import WeightStore, layout_of
from helpers import tiny_head, tiny_head_config

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    f"{kind} number {i}: "
    for i, kind in enumerate(["def f(x):", "Question: apples", "ROMEO:", "The module", "import os", "Tom has"])
]
K, DVS, MAX_NEW = 3, 512, 24


# ---- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(ref_tokenizer):
    from helpers import make_tiny_llama

    t = ref_tokenizer
    return make_tiny_llama(len(t), bos=t.bos_token_id, eos=t.eos_token_id, pad=t.pad_token_id, init_range=0.1)


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("target") / "tiny"
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def pretrained_dir(model, ref_tokenizer, tmp_path_factory):
    """A head that already drafts these prompts well (tau ~2 at K=3), so a random head is worse."""
    eng = Engine(model=model, tokenizer=ref_tokenizer, num_speculative_steps=0)
    head, _ = train_head_offline(
        eng,
        PROMPTS,
        max_new_tokens=MAX_NEW,
        steps=150,
        batch_size=6,
        lr=3e-3,
        unroll=3,
        draft_vocab_size=DVS,
        log=lambda *_: None,
    )
    path = tmp_path_factory.mktemp("head") / "pre"
    head.save(path)
    return str(path)


class Rig:
    """Engine (record_sink -> real ring), store with version 1 = the engine's head, status segment."""

    def __init__(self, model, tok, model_dir, head_dir=None):
        self.engine = Engine(
            model=model, tokenizer=tok, num_speculative_steps=K, draft_vocab_size=DVS, draft_model_path=head_dir
        )
        self.head_dir = head_dir
        hc = self.engine.head.config
        self.ring = SignalRing.create(
            "test_tr_ring", 1024, K + 1, len(hc.aux_layer_ids) * hc.target_hidden_size, hc.hidden_size, K
        )
        self.store = WeightStore.create("test_tr_ws", layout_of(self.engine.head.serving_state()))
        assert self.store.publish(self.engine.head.serving_state()) == 1
        self.status = TrainerStatus.create("test_tr_st")
        self.engine.record_sink = self.ring.write_many
        self.model_dir = model_dir
        self.thread = self.trainer = self.stop = None
        self.error = []

    def spec(self, checkpoint_dir=None, **config):
        return {
            "ring": self.ring.spec(),
            "store": self.store.spec(),
            "status": self.status.spec(),
            "model_path": self.model_dir,
            "init_head": self.head_dir,
            "aux_layer_ids": list(self.engine.target.aux_layer_ids),
            "draft_vocab_size": DVS,
            "config": config,
            "checkpoint_dir": checkpoint_dir,
            "threads": 1,
        }

    def start(self, spec):
        self.stop = threading.Event()
        self.trainer = Trainer(spec, self.stop)

        def target():
            try:
                self.trainer.run()
            except BaseException as e:  # surfaced by drive()/finish()
                self.error.append(e)

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()
        return self.trainer

    def snap(self):
        return self.status.snapshot()

    def caught_up(self):
        s = self.snap()
        return s["records_read"] + s["ring_drops_seen"] >= self.ring.stats()["written"]

    def drive(self, until, timeout=25.0, traffic=True):
        """Serve rounds of PROMPTS, letting the trainer catch up after each, until `until()`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check()
            if until():
                return True
            if traffic:
                self.engine.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW))
            while time.monotonic() < deadline and not self.caught_up():
                self._check()
                time.sleep(0.01)
            if not traffic:
                time.sleep(0.02)
        self._check()
        return until()

    def wait_idle(self, timeout=10.0):
        """No traffic: wait until everything written was read and the step count is stable."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            self._check()
            s = self.snap()
            if self.caught_up() and last is not None and s["train_steps"] == last:
                return s
            last = s["train_steps"]
            time.sleep(0.3)
        raise AssertionError("the trainer did not go idle")

    def _check(self):
        if self.error:
            raise self.error[0]
        if self.thread is not None and not self.thread.is_alive() and not self.stop.is_set():
            raise AssertionError("the trainer thread died")

    def finish(self):
        if self.thread is not None:
            self.stop.set()
            self.thread.join(30)
            assert not self.thread.is_alive(), "the trainer did not stop"
            self.trainer.close()
            self.thread = None
        self._check()

    def close(self):
        if self.thread is not None:
            self.stop.set()
            self.thread.join(30)
            self.trainer.close()
        for seg in (self.ring, self.store, self.status):
            seg.close()


@pytest.fixture
def make_rig(model, ref_tokenizer, model_dir):
    rigs = []

    def make(head_dir=None):
        rig = Rig(model, ref_tokenizer, model_dir, head_dir)
        rigs.append(rig)
        return rig

    yield make
    for r in rigs:
        r.close()


@pytest.fixture
def published(monkeypatch):
    """Spy: every (version, state) any WeightStore in this process publishes."""
    seen = []
    original = WeightStore.publish

    def spy(self, state, **kw):
        version = original(self, state, **kw)
        seen.append((version, {k: v.detach().clone() for k, v in state.items()}))
        return version

    monkeypatch.setattr(WeightStore, "publish", spy)
    return seen


def _unattached_spec(**config):
    """A valid spec for a Trainer that is never set up (nothing is attached)."""
    return TrainerSpec(
        ring={"name": "unused"}, store={"name": "unused"}, model_path="unused", aux_layer_ids=[0], config=config
    )


def simulated_accept_length(head, held_out, steps, group=8):
    """(mean simulated accept length over every valid start, number of starts), or None."""
    return mean_of_sums(simulated_tau_sums(head, held_out, steps, group))


def _finite(state):
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def _store_state(store):
    version, views = store.poll(0)
    return version, {n: v.clone() for n, v in zip(store.names, views)}


# ---- (6) stitching ---------------------------------------------------------------------------
A_DIM, H_DIM = 6, 2


def _tok(p):
    return 100 + p


def _rec(seq, rid, h, position, accepted, outcome, rows=None):
    rows = accepted + 1 if rows is None else rows
    pos = torch.arange(position, position + rows)
    return RingRecord(
        seq=seq,
        request_id=rid,
        request_hash=h,
        position=position,
        num_accepted=accepted,
        draft_version=1,
        draft_tokens=torch.zeros(K, dtype=torch.long),
        target_tokens=torch.zeros(K, dtype=torch.long),
        outcome=torch.tensor(outcome, dtype=torch.int8),
        input_tokens=_tok(pos),
        next_tokens=_tok(pos + 1),
        aux_hidden=pos.float().unsqueeze(1).expand(rows, A_DIM).clone(),
        final_hidden=-pos.float().unsqueeze(1).expand(rows, H_DIM).clone(),
    )


def test_stitching_joins_records_of_a_request_and_splits_at_gaps():
    st = Stitcher(max_tokens=64, rejected_weight=2.0)
    st.add(
        [
            _rec(0, "a", 11, 10, 2, [1, 1, 0]),  # covers 10..12, the draft for 13 was rejected
            _rec(1, "b", 22, 5, 0, [0, -1, -1]),  # covers 5, rejected at 6
            _rec(2, "a", 11, 13, 0, [0, -1, -1]),  # continues a: covers 13, rejected at 14
            _rec(3, "c", 33, 0, 0, [0, -1, -1]),  # a 2-token sequence: skipped
            _rec(4, "a", 11, 20, 1, [1, 0, -1]),  # gap (expected 14): new segment 20..21 (+22)
            _rec(5, "b", 22, 6, 3, [1, 1, 1]),  # continues b: covers 6..9, all accepted
            _rec(6, "d", 44, 30, 3, [1, 1, 1], rows=2),  # truncated by the ring: covers 30..31 only
            _rec(7, "d", 44, 34, 1, [1, 0, -1]),  # so this one starts a new segment
        ]
    )
    assert (st.closed_tokens + st.open_tokens) == 4 + 5 + 1 + 2 + 2 + 2
    st.close_all()
    got = {(int(s.tokens[0]) - 100): (s, w) for s, w in st.take()}
    assert (st.closed_tokens + st.open_tokens) == 0 and st.take() == []
    assert sorted(got) == [5, 10, 20, 30, 34]  # c (2 tokens) skipped
    for start, n, rejected in ((10, 5, [3, 4]), (5, 6, [1]), (20, 3, [2]), (30, 3, []), (34, 3, [2])):
        s, w = got[start]
        assert s.tokens.tolist() == [_tok(p) for p in range(start, start + n)], start
        assert s.first_generated == 0
        assert s.aux.shape == (n, A_DIM) and s.final.shape == (n, H_DIM)
        rows = torch.arange(start, start + n - 1).float()
        assert torch.equal(s.aux[:-1, 0], rows) and torch.equal(s.final[:-1, 0], -rows)
        assert not s.aux[-1].any() and not s.final[-1].any()  # the final next token has no state yet
        want = torch.ones(n)
        want[rejected] = 3.0
        assert torch.equal(w, want), (start, w)
    # HeadBatch: weights[i][j] weighs the prediction of token j, i.e. position t = j - 2.
    order = [10, 5, 20]
    batch = HeadBatch.from_sequences([got[k][0] for k in order], [got[k][1] for k in order])
    assert batch.mask[0].tolist() == [True, True, True, False, False]  # padded to b's length
    assert batch.position_weight[0, :3].tolist() == [1.0, 3.0, 3.0]  # tokens 2, 3, 4
    assert batch.position_weight[1, :4].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert batch.next_tokens[0, :4].tolist() == [_tok(p) for p in range(11, 15)]


def _loss_rows(seqs_weights):
    """{absolute position t: (aux row, next token, target row, weight)} over every loss position of
    the sequences (a sequence's first token is at position tokens[0] - 100, as _rec makes them)."""
    seqs, weights = zip(*seqs_weights)
    batch = HeadBatch.from_sequences(list(seqs), list(weights))
    out = {}
    for i, s in enumerate(seqs):
        start = int(s.tokens[0]) - 100
        for t in batch.mask[i].nonzero().flatten().tolist():
            assert start + t not in out, f"position {start + t} trained twice"
            row = batch.aux[i, t], batch.next_tokens[i, t], batch.final_next[i, t], batch.position_weight[i, t]
            out[start + t] = tuple(x.tolist() for x in row)
    return out


@pytest.mark.parametrize("cuts", [[12, 22], [60]])
def test_cutting_a_running_request_trains_each_position_once_as_the_whole_would(cuts):
    # One request, 80 rows in records of 2 (every other draft rejected); cut while it runs at the
    # given row counts, then closed. Reference: the same records stitched whole.
    recs = [_rec(i, "a", 7, 2 * i, 1, [1, 0, -1] if i % 2 else [1, 1, 1], rows=2) for i in range(40)]
    whole = Stitcher(max_tokens=512)
    whole.add(recs)
    whole.close_all()
    want = _loss_rows(whole.take())
    assert sorted(want) == list(range(0, 79))

    st = Stitcher(max_tokens=512)
    got, fed = {}, 0
    for rows in cuts:
        st.add(recs[fed // 2 : rows // 2])
        fed = rows
        assert st.cut_open(5) == 1 and st.open_tokens == rows  # the request goes on
        assert st.cut_open(5) == 0  # nothing new since
        new = _loss_rows(st.take())
        assert not new.keys() & got.keys()
        got |= new
    st.add(recs[fed // 2 :])
    st.close_all()
    (last,) = st.take()
    assert len(last[0].tokens) <= 80 - cuts[-1] + 1 + CUT_CONTEXT + 1  # old rows kept as context only
    new = _loss_rows([last])
    assert not new.keys() & got.keys()
    assert got | new == want


def test_stitching_cuts_long_segments():
    st = Stitcher(max_tokens=8)
    st.add([_rec(i, "a", 1, 3 * i, 2, [1, 1, 0]) for i in range(4)])  # 12 contiguous rows
    assert st.closed_tokens == 6 and st.open_tokens == 6
    seqs = [s for s, _ in st.take()]
    st.close_all()
    seqs += [s for s, _ in st.take()]
    assert [len(s.tokens) for s in seqs] == [7, 7]  # cut before a record would pass 8 tokens
    assert [int(s.tokens[0]) - 100 for s in seqs] == [0, 6]
    assert sum(len(s.tokens) - 1 for s in seqs) == 12


def test_quiet_requests_are_closed_and_take_respects_the_token_budget():
    st = Stitcher(max_tokens=64)
    # Two requests decode together (one record each per engine step); then "a" finishes.
    recs, seq = [], 0
    for step in range(3):
        for rid, h in (("a", 1), ("b", 2)):
            recs.append(_rec(seq, rid, h, 10 + 2 * step, 1, [1, 0, -1]))
            seq += 1
    st.add(recs)
    assert st.closed_tokens == 0 and st.open_tokens == 12
    st.add([_rec(seq + i, "b", 2, 16 + 2 * i, 1, [1, 0, -1]) for i in range(4)])  # only b goes on
    assert st.closed_tokens == 6 and st.open_tokens == 14  # a missed more than two steps: closed
    st.add([_rec(100 + i, "c", 3 + i, 0, 3, [1, 1, 1]) for i in range(3)])  # b goes quiet too
    st.close_all()
    assert [len(s.tokens) - 1 for s, _ in st.take(max_tokens=10)] == [6, 14]  # oldest first, stop past 10
    assert st.closed_tokens == 12 and len(st.take()) == 3 and st.closed_tokens == 0


# ---- (7) simulated accept length ---------------------------------------------------------------
def _naive_tau(step_logits, hot, tgt, mask):
    b, t = mask.shape
    total, count = 0.0, 0
    for i in range(b):
        for s in range(t):
            if not mask[i, s]:
                continue
            tau = 1
            for k in range(len(step_logits)):
                ok = True
                for j in range(k + 1):
                    pos = s + j
                    if pos >= t or not mask[i, pos] or int(hot[step_logits[j][i, pos].argmax()]) != int(tgt[i, pos]):
                        ok = False
                        break
                if not ok:
                    break
                tau += 1
            total += tau
            count += 1
    return total / count


def test_simulated_tau_matches_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        b, t, vd, steps = 3, 9, 3, 1 + trial % 4
        hot = torch.tensor([2, 5, 7])
        logits = [torch.randn(b, t, vd, generator=g) for _ in range(steps)]
        tgt = hot[torch.randint(0, vd, (b, t), generator=g)]
        tgt[torch.rand(b, t, generator=g) < 0.15] = 4  # sometimes outside the draft vocabulary
        mask = torch.rand(b, t, generator=g) < 0.8
        mask[:, -1] = False
        tau = simulated_tau_per_start(logits, hot, tgt, mask)
        assert float(tau[mask].mean()) == pytest.approx(_naive_tau(logits, hot, tgt, mask), abs=1e-12)
    # Perfect agreement: every start gets 1 + the steps that fit before the end.
    logits = [torch.nn.functional.one_hot(torch.zeros(1, 6, dtype=torch.long), 3).float()] * 3
    tau = simulated_tau_per_start(logits, hot, torch.full((1, 6), 2), torch.ones(1, 6, dtype=torch.bool))
    assert tau[0].tolist() == [4, 4, 4, 4, 3, 2]


def test_simulated_accept_length_of_a_head_matches_the_naive_loop():
    torch.manual_seed(0)
    cfg = tiny_head_config(hidden=16, heads=2, kv_heads=1, vocab=12, draft_vocab=4)
    head = tiny_head(cfg, torch.nn.Embedding(12, 16), hot_ids=torch.tensor([1, 3, 4, 9]))
    lm_w = torch.randn(12, 16)
    seqs = [Sequence(torch.randint(0, 12, (n,)), torch.randn(n, 48), torch.randn(n, 16), 0) for n in (7, 4, 9)]
    held = [(s, (s.final[1:] @ lm_w.T).argmax(-1)) for s in seqs]
    # Make agreement likely: the target prefers the head's own step-0 choice at most positions.
    batch = HeadBatch.from_sequences(seqs)
    with torch.no_grad():
        logits = ttt_logits(head, batch.aux, batch.next_tokens, 3)
    tgt = torch.full_like(batch.next_tokens, -1)
    for i, (_, am) in enumerate(held):
        tgt[i, : am.numel()] = am
    tgt = torch.where(torch.rand(tgt.shape) < 0.7, head.hot_ids[logits[0].argmax(-1)], tgt)
    held = [(s, tgt[i, : len(s.tokens) - 1]) for i, s in enumerate(seqs)]
    got, starts = simulated_accept_length(head, held, 3, group=2)
    assert starts == int(batch.mask.sum())
    assert got == pytest.approx(_naive_tau(logits, head.hot_ids, tgt, batch.mask), abs=1e-9)
    assert got > 1.0
    assert simulated_accept_length(head, [], 3) is None
    # Per-sequence figures do not depend on the batch a sequence was padded into (the trainer caches
    # the served head's figures per sequence), and they add up to the mean.
    alone = [simulated_tau_sums(head, [h], 3)[0] for h in held]
    together = simulated_tau_sums(head, held, 3, group=3)
    assert [c for _, c in alone] == [c for _, c in together] == batch.mask.sum(1).tolist()
    assert [s for s, _ in alone] == pytest.approx([s for s, _ in together], abs=1e-9)
    assert sum(s for s, _ in together) / starts == pytest.approx(got, abs=1e-9)


# ---- config and status -----------------------------------------------------------------------
def test_config_validation():
    cfg = TrainerConfig()
    assert (cfg.objective, cfg.clip, cfg.unroll, cfg.tokens_per_step, cfg.publish_every) == ("kl", 2.5, 5, 64, 16)
    assert cfg.resolved_lr(pretrained=False) == 1e-3 and cfg.resolved_lr(pretrained=True) == 1e-3
    assert TrainerConfig(lr=3e-3).resolved_lr(True) == 3e-3
    assert TrainerConfig(inject=["nan@2", "random@4"]).inject_at() == {2: "nan", 4: "random"}
    for bad, match in (
        ({"objective": "tv"}, "objective"),
        ({"lr": 0}, "lr"),
        ({"unroll": 0}, "unroll"),
        ({"tokens_per_step": 1.5}, "tokens_per_step"),
        ({"holdout_fraction": 1.0}, "holdout_fraction"),
        ({"guardrail_on": "train"}, "guardrail_on"),
        ({"margin": -1}, "margin"),
        ({"segment_idle_s": 0}, "segment_idle_s"),
        ({"inject": ["boom@1"]}, "inject"),
        ({"inject": ["nan@0"]}, "inject"),
        ({"inject_hold_s": -1}, "inject_hold_s"),
        ({"inject_hold_s": float("inf")}, "inject_hold_s"),
        ({"keep_checkpoints": 0}, "keep_checkpoints"),
        ({"replay_half_life": -1}, "replay_half_life"),
        ({"nope": 1}, "unknown trainer config keys"),
    ):
        with pytest.raises(ValueError, match=match):
            TrainerConfig.from_dict(bad)


def test_reservoir_keeps_a_uniform_sample_of_all_history():
    tr = Trainer(_unattached_spec(replay_reservoir=50, seed=3))
    for start in range(0, 5000, 100):  # sequences arrive in steps, as train_once hands them over
        tr._add_to_reservoir([(i, None) for i in range(start, start + 100)])
    kept = sorted(i for i, _ in tr.reservoir)
    assert len(kept) == 50 and len(set(kept)) == 50
    # Uniform over 0..4999: about half from each half of history (a recent-only buffer would hold 4950+).
    assert 15 <= sum(i < 2500 for i in kept) <= 35, kept
    off = Trainer(_unattached_spec())
    off._add_to_reservoir([(1, None)])
    assert off.reservoir == []


def test_trainer_stops_when_its_parent_goes_away():
    assert not Trainer(_unattached_spec(), parent_pid=os.getppid()).should_stop()
    orphan = Trainer(_unattached_spec(), parent_pid=os.getppid() + 1_000_000)  # "reparented"
    assert orphan.should_stop() and orphan.stop_event.is_set()


def test_status_segment_roundtrip_and_permissions():
    owner = TrainerStatus.create("test_tr_st")
    try:
        assert oct(os.stat(os.path.join(SHM_DIR, owner.name)).st_mode & 0o777) == "0o600"
        reader = TrainerStatus.attach(json.loads(json.dumps(owner.spec())))
        snap = reader.snapshot()
        assert set(snap) == set(TrainerStatus.FIELDS) and snap["heartbeat"] == 0 and snap["loss"] is None
        reader.write(heartbeat=12.5, train_steps=7, loss=0.25, refused=2, last_published_version=3)
        snap = owner.snapshot()
        assert (snap["heartbeat"], snap["train_steps"], snap["loss"], snap["refused"]) == (12.5, 7, 0.25, 2)
        assert isinstance(snap["train_steps"], int) and snap["last_published_version"] == 3
        with pytest.raises(ValueError, match="unknown status fields"):
            reader.write(bogus=1)
        reader.close()
        assert os.path.exists(os.path.join(SHM_DIR, owner.name))  # a reader never unlinks
    finally:
        owner.close()
    assert not os.path.exists(os.path.join(SHM_DIR, owner.name))


# ---- (3) checkpoints, unit level ---------------------------------------------------------------
def _small_head(seed):
    return tiny_head(tiny_head_config(hidden=16, heads=2, kv_heads=1, vocab=40, draft_vocab=8), seed=seed)


def test_checkpoints_are_atomic_private_pruned_and_corruption_is_skipped(tmp_path):
    root = tmp_path / "ckpt"
    assert newest_checkpoint(root) is None and newest_checkpoint(None) is None
    (root / ".tmp-step_00000099-crashed").mkdir(parents=True)  # a crash mid-write leaves this behind
    heads = {}
    for steps in (4, 8, 12):
        heads[steps] = _small_head(steps)
        path = save_checkpoint(heads[steps], root, steps, {"steps": steps, "publishes": steps // 4}, keep=2)
        assert path == root / f"step_{steps:08d}"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000008", "step_00000012"]  # pruned, no temp dirs
    for p in root.iterdir():
        assert oct(p.stat().st_mode & 0o777) == "0o700"
        assert sorted(f.name for f in p.iterdir()) == ["config.json", "model.safetensors", "trainer_state.json"]
        for f in p.iterdir():
            assert oct(f.stat().st_mode & 0o777) == "0o600", f
    assert json.loads((root / "step_00000012" / "trainer_state.json").read_text())["steps"] == 12
    newest = newest_checkpoint(root)
    assert newest == str(root / "step_00000012")
    loaded = Eagle3Head.load(newest, torch.zeros(40, 16))
    assert torch.equal(loaded.fc.weight, heads[12].fc.weight)
    # Truncate the newest: it is skipped. A step dir without weights is skipped too.
    f = root / "step_00000012" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    (root / "step_00000016").mkdir()
    (root / "step_00000016" / "config.json").write_text("{}")
    assert newest_checkpoint(root) == str(root / "step_00000008")
    # Saving into something that is not a directory raises (the trainer counts it).
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError):
        save_checkpoint(heads[4], blocker, 20, {}, keep=2)


def test_the_optimizer_takes_its_second_moment_decay_from_the_config():
    tr = Trainer(_unattached_spec(lr=1e-3, adam_beta2=0.95))
    tr.head, tr.lr = _small_head(0), 1e-3
    assert tr._new_optimizer().param_groups[0]["betas"] == (0.9, 0.95)


# ---- draft vocabulary refresh --------------------------------------------------------------------
def test_vocab_refresh_remaps_lm_head_rows_and_optimizer_state():
    tr = Trainer(_unattached_spec(lr=1e-3))  # not set up: only the pieces refresh_vocab uses
    head = _small_head(0)  # vocab 40, draft vocab 8, hot ids 0..7
    tr.head, tr.vocab_size, tr.device, tr.lr = head, 40, torch.device("cpu"), 1e-3
    tr.opt = tr._new_optimizer()
    (head.lm_head.weight**2).sum().backward()
    tr.opt.step()
    w0 = head.lm_head.weight.detach().clone()
    m0 = tr.opt.state[head.lm_head.weight]["exp_avg"].clone()
    tr.counts = torch.zeros(40, dtype=torch.float64)
    tr.counts[[0, 1, 2, 3, 4, 5, 20, 21]] = 10.0  # 6 and 7 fall out, 20 and 21 come in: 25% changed
    assert tr.refresh_vocab()
    assert head.hot_ids.tolist() == [0, 1, 2, 3, 4, 5, 20, 21]
    w = head.lm_head.weight.detach()
    assert torch.equal(w[:6], w0[:6]) and not w[6:].any()
    m = tr.opt.state[head.lm_head.weight]["exp_avg"]
    assert torch.equal(m[:6], m0[:6]) and not m[6:].any()
    state = head.serving_state()  # d2t / t2d travel with the published weights
    assert torch.equal(state["d2t"] + torch.arange(8), torch.tensor([0, 1, 2, 3, 4, 5, 20, 21]))
    assert state["t2d"].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 20, 21]
    assert tr.counts[0] == 5.0  # decayed, so the vocabulary follows recent traffic
    # The same set again: nothing to remap.
    assert not tr.refresh_vocab()
    assert head.hot_ids.tolist() == [0, 1, 2, 3, 4, 5, 20, 21]


# ---- live loop: (1) learning and publishing, checkpoints on the way ----------------------------
def test_trainer_learns_from_served_traffic_and_publishes(make_rig, tmp_path):
    rig = make_rig()
    _, v1 = _store_state(rig.store)
    ckpt = tmp_path / "ckpt"
    rig.start(
        rig.spec(
            checkpoint_dir=str(ckpt),
            lr=3e-3,
            tokens_per_step=64,
            publish_every=2,
            unroll=3,
            checkpoint_every=2,
            keep_checkpoints=2,
            holdout_fraction=0.2,
            margin=10.0,
        )
    )
    assert rig.drive(lambda: rig.snap()["train_steps"] >= 20 and rig.snap()["publishes"] >= 4)
    rig.finish()
    s = rig.snap()
    losses = rig.trainer.losses
    assert s["records_read"] > 0 and s["train_steps"] == len(losses) and s["loss"] == pytest.approx(losses[-1])
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses
    assert s["refused"] == 0 and s["publishes"] >= 4
    # Idle time (the ring empty between waves) went to replay, at most three per fresh step.
    assert 0 < s["replay_steps"] <= 3 * (s["train_steps"] - s["replay_steps"]), s
    assert rig.store.version == 1 + s["publishes"] == s["last_published_version"]
    assert rig.store.verify(rig.store.version)
    version, latest = _store_state(rig.store)
    assert not torch.equal(latest["fc.weight"], v1["fc.weight"])
    assert not torch.equal(latest["lm_head.weight"], v1["lm_head.weight"])
    assert _finite(latest) and s["heartbeat"] > time.time() - 60
    assert s["sim_tau_served"] is not None and s["sim_tau_served"] >= 1.0
    # The newest checkpoint is the last one written, and it loads into the engine's head class.
    steps = sorted(int(p.name[5:]) for p in ckpt.iterdir())
    assert len(steps) == 2 and s["checkpoint_failures"] == 0
    newest = newest_checkpoint(ckpt)
    assert newest == str(ckpt / f"step_{steps[-1]:08d}")
    state = json.loads((Path(newest) / "trainer_state.json").read_text())
    assert state["steps"] == steps[-1] and state["config"]["lr"] == 3e-3
    Eagle3Head.load(newest, rig.engine.target.hf.get_input_embeddings())


def test_requests_shorter_than_the_unroll_never_stop_training(make_rig):
    # Issue 18: a flood of 1-token prompts with 2 new tokens gave sequences shorter than the unroll,
    # and the guardrail's unroll on them killed the trainer at its first publish round.
    rig = make_rig()
    rig.start(rig.spec(tokens_per_step=8, publish_every=1, unroll=5, holdout_fraction=0.5, margin=10.0))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and rig.trainer.attempts < 4:
        rig._check()
        rig.engine.generate(["a"] * 4, SamplingParams(max_new_tokens=2))
        time.sleep(0.05)
    rig.finish()
    s = rig.snap()
    assert rig.trainer.attempts >= 4 and s["publishes"] >= 1, (s, rig.ring.stats())
    assert s["step_failures"] == 0, s
    assert min(len(seq.tokens) for seq, _ in rig.trainer.replay) < 5  # the short ones were trained on
    assert s["trained_positions"] > 0 and s["recorded_positions"] >= s["records_read"] > 0


def test_decode_steps_at_k0_reach_training_and_are_counted_fresh(make_rig):
    """An engine drafting nothing (adaptive K at 0) still records every generated position, and the
    trainer learns from each of them once (`fresh_positions`), though it keeps no prompt rows."""
    rig = make_rig()
    rig.engine.k_policy = lambda reqs: 0
    decode_rows = []

    def sink(records):
        decode_rows.append(sum(r.input_tokens.numel() for r in records if not r.prefill))
        rig.ring.write_many(records)

    rig.engine.record_sink = sink
    rig.start(rig.spec(tokens_per_step=64, prompt_tokens=0, segment_idle_s=0.2))
    rig.engine.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW))
    recorded = sum(decode_rows)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and rig.snap()["fresh_positions"] < 0.8 * recorded:
        rig._check()
        time.sleep(0.05)
    s = rig.snap()
    rig.finish()
    # Every sequence's positions are in the loss but its last few (no target state yet): >= 80 %.
    assert 0.8 * recorded <= s["fresh_positions"] <= min(recorded, s["trained_positions"]), (s, recorded)


def test_trainer_reads_a_replica_ring_that_appears_after_it_started(make_rig, tmp_path):
    # Issue 13: with SGLang's --dp N every replica's leader writes its own ring; replica d >= 1
    # hands it over as ring_dp<d>.json in the handoff dir, possibly after the trainer started.
    rig = make_rig()
    rig.start(dict(rig.spec(tokens_per_step=64), ring_dir=str(tmp_path)))
    params = SamplingParams(max_new_tokens=MAX_NEW)

    def read_all(n):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and rig.snap()["records_read"] < n:
            rig._check()
            time.sleep(0.02)
        return rig.snap()["records_read"]

    rig.engine.generate(PROMPTS[:3], params)
    first = rig.ring.stats()["written"]
    assert read_all(first) == first
    spec = rig.ring.spec()
    second = SignalRing.create("test_tr_ring_dp1", 1024, spec["max_tokens"], spec["aux_dim"], spec["hidden_dim"], K)
    try:
        write_handoff({"ring": second.spec(), "dp_rank": 1}, str(tmp_path / replica_ring_file(1)))
        rig.engine.record_sink = second.write_many  # the traffic of replica 1
        positions = rig.snap()["recorded_positions"]
        rig.engine.generate(PROMPTS[3:], params)
        written = second.stats()["written"]
        assert written > 0 and rig.ring.stats()["written"] == first
        assert read_all(first + written) == first + written
        s = rig.snap()
        assert s["ring_drops_seen"] == 0 and s["recorded_positions"] > positions
        assert rig.trainer.ring.stats() == {"written": first + written, "drops": 0, "truncated": 0, "rings": 2}
        rig.finish()
    finally:
        second.close()


# ---- (2) guardrail -----------------------------------------------------------------------------
@pytest.mark.parametrize("guardrail_on", ["fresh", "held_out"])
def test_guardrail_refuses_injected_nan_and_random_heads(make_rig, pretrained_dir, published, guardrail_on):
    rig = make_rig(pretrained_dir)
    # A small lr (Aurora's pretrained setting): honest candidates stay close to the served head.
    rig.start(
        rig.spec(
            tokens_per_step=64,
            publish_every=1,
            unroll=3,
            guardrail_on=guardrail_on,
            holdout_fraction=0.5,
            lr=1e-5,
            inject=["nan@2", "random@4"],
        )
    )
    assert rig.drive(lambda: rig.trainer.attempts >= 6)
    rig.finish()
    s = rig.snap()
    assert rig.trainer.lr == 1e-5
    assert s["refused"] == 2, s
    assert s["publishes"] == rig.trainer.attempts - 2
    assert rig.store.version == 1 + s["publishes"] == s["last_published_version"]
    ours = [(v, st) for v, st in published if v >= 2]  # 1 is the launcher's
    assert [v for v, _ in ours] == list(range(2, rig.store.version + 1))
    assert all(_finite(st) for _, st in ours)
    hist = {h["attempt"]: h for h in rig.trainer.history}
    assert (hist[2]["fault"], hist[2]["published"], hist[2]["reason"]) == ("nan", False, "non-finite")
    rnd = hist[4]
    assert (rnd["fault"], rnd["published"], rnd["reason"]) == ("random", False, "guardrail")
    assert rnd["sim_tau_candidate"] < rnd["sim_tau_served"] - 0.05
    assert rnd["sim_tau_served"] > 1.1  # the pretrained head drafts; the random one does not
    assert all(h["published"] for a, h in hist.items() if a not in (2, 4))
    served_fc = [st["fc.weight"] for _, st in ours]
    pre = Eagle3Head.load(pretrained_dir, torch.zeros(0))
    assert all((fc - pre.fc.weight).abs().max() < 0.05 for fc in served_fc)
    tr = rig.trainer
    if guardrail_on == "fresh":
        # Every sequence was trained on, and the judged ones are the newest: each scored before training.
        assert not tr.holdout and 0 < len(tr.judged) <= tr.cfg.holdout_capacity
        newest = [e[0] for e, _, _ in tr.judged]
        assert all(any(seq is r for r, _ in tr.replay) for seq in newest[-4:])
        return
    # The served weights' figures are cached per held-out sequence: the cache agrees with a fresh pass.
    assert tr._served_sums and tr._served_sums_of is tr.served_state
    cached = tr._served_sim_tau()
    tr.eval_head.load_serving_state(tr.served_state)
    assert cached == pytest.approx(simulated_accept_length(tr.eval_head, list(tr.holdout), tr.cfg.unroll)[0], abs=1e-9)


# ---- bypass + (4) rollback ---------------------------------------------------------------------
def test_bypass_publishes_nan_and_rollback_reloads_the_previous_version(make_rig, pretrained_dir, published):
    rig = make_rig(pretrained_dir)
    _, v1 = _store_state(rig.store)
    trainer = rig.start(
        rig.spec(
            tokens_per_step=64,
            publish_every=1,
            unroll=3,
            lr=1e-3,
            holdout_fraction=0.3,
            margin=10.0,
            inject=["nan@3"],
            inject_bypass_guardrail=True,
        )
    )
    assert rig.drive(lambda: rig.store.version >= 4)
    s = rig.wait_idle()  # no more traffic: the head only changes through the rollback below
    nan_version = [v for v, st in published if not _finite(st)]
    assert nan_version == [4] and s["refused"] == 0  # attempt 3 -> version 4 (1 is the launcher's)
    # The engine side sees the NaN version in the store (what its rollback test needs).
    assert published[3][0] == 4 and any(torch.isnan(t).any() for t in published[3][1].values() if t.is_floating_point())
    latest = rig.store.version
    before = {k: v.clone() for k, v in trainer.head.state_dict().items()}
    assert trainer.opt.state  # AdamW moments exist before the rollback
    rig.store.request_rollback(latest)
    assert rig.drive(lambda: rig.snap()["rollbacks_seen"] == 1, timeout=10, traffic=False)
    time.sleep(0.1)
    # The newest finite version before the rolled-back one (the NaN version is never reloaded).
    earlier = [(v, st) for v, st in published if v < latest and _finite(st)]
    want = earlier[-1][1] if earlier else v1
    got = trainer.head.state_dict()
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    assert not torch.equal(got["fc.weight"], before["fc.weight"])
    assert not trainer.opt.state  # optimizer reset
    assert all(v != latest for v, _ in trainer.kept)
    rig.finish()
    assert rig.snap()["rollbacks_seen"] == 1


def test_a_published_fault_holds_new_versions_until_the_engine_answers(make_rig, pretrained_dir):
    """A drill must be judged: while the engine has not refused or rolled back the injected version,
    the trainer trains on but publishes nothing that would supersede it."""
    rig = make_rig(pretrained_dir)
    rig.start(
        rig.spec(
            tokens_per_step=64,
            publish_every=1,
            unroll=3,
            lr=1e-3,
            margin=10.0,
            inject=["nan@2"],
            inject_bypass_guardrail=True,
        )
    )
    assert rig.drive(lambda: rig.store.version >= 3)  # attempt 2 -> version 3 (1 is the launcher's)
    steps = rig.snap()["train_steps"]
    assert rig.drive(lambda: rig.snap()["train_steps"] >= steps + 4)
    assert rig.store.version == 3  # four publish rounds held
    rig.store.request_rollback(3)
    assert rig.drive(lambda: rig.store.version >= 4)
    rig.finish()


# ---- (3) failing checkpoint writes are counted, never fatal ------------------------------------
@pytest.mark.parametrize("kind", ["not_a_dir", "read_only"])
def test_checkpoint_failures_are_counted_not_fatal(make_rig, tmp_path, kind):
    target = tmp_path / "ckpt"
    if kind == "not_a_dir":
        target.write_text("a file where the checkpoint dir should be")
    else:
        target.mkdir()
        os.chmod(target, 0o500)
        if os.access(target, os.W_OK):  # root ignores the mode bits
            os.chmod(target, 0o700)
            pytest.skip("running as root: chmod cannot make the directory unwritable")
    rig = make_rig()
    try:
        # Also runs the other two objectives end to end.
        objective = "kl_rejected" if kind == "not_a_dir" else "accept"
        rig.start(
            rig.spec(
                checkpoint_dir=str(target),
                lr=3e-3,
                tokens_per_step=64,
                publish_every=1,
                unroll=2,
                checkpoint_every=1,
                margin=10.0,
                objective=objective,
            )
        )
        assert rig.drive(lambda: rig.snap()["publishes"] >= 3)
        rig.finish()
    finally:
        if kind == "read_only":
            os.chmod(target, 0o700)
    s = rig.snap()
    assert s["checkpoint_failures"] >= 3 and s["publishes"] >= 3
    assert all(math.isfinite(x) for x in rig.trainer.losses) and s["refused"] == 0
    if kind == "read_only":
        assert list(target.iterdir()) == []


# ---- (5) the sidecar process -------------------------------------------------------------------
def test_sigterm_exits_zero_promptly(make_rig, tmp_path):
    rig = make_rig()
    spec = rig.spec(tokens_per_step=32, publish_every=1, unroll=2, lr=1e-3)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "aurora_sgl.trainer", "--spec", str(path), "--log-level", "warning"],
        cwd=str(ROOT),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while rig.snap()["last_published_version"] < 1:  # set once the trainer is in its loop
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the trainer did not start"
            time.sleep(0.05)
        rig.engine.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW))  # give it work
        deadline = time.monotonic() + 20
        while rig.snap()["train_steps"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        steps_at_signal = rig.snap()["train_steps"]  # read after: at most the step in flight follows
        rc = proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = proc.stdout.read().decode()
    assert rc == 0, out
    s = rig.snap()
    # Promptly means at the step boundary, not after the ring is drained (no wall-clock bound: CI
    # machines are loaded; a hang is proc.wait's timeout).
    assert 1 <= s["train_steps"] <= steps_at_signal + 1, (steps_at_signal, s["train_steps"])
    assert s["records_read"] > 0
    assert "Traceback" not in out
    # The trainer attached and closed; the segments are still the launcher's to unlink.
    for name in (rig.ring.name, rig.store.name, rig.status.name):
        assert os.path.exists(os.path.join(SHM_DIR, name))
    assert not math.isnan(s["heartbeat"])


def _undrafted_rec(seq, position, rows, h=1, prefill=False):
    """A record without drafts: prompt rows (`prefill`), or a decode step at K = 0."""
    rec = _rec(seq, "p", h, position, rows - 1, [-1, -1, -1])
    rec.draft_tokens = torch.full((K,), -1, dtype=torch.long)
    rec.prefill = prefill
    return rec


def _prompt_rec(seq, position, rows, h=1):
    return _undrafted_rec(seq, position, rows, h, prefill=True)


@pytest.mark.parametrize("prompt_tokens,first", [(-1, 0), (6, 12), (4, 16), (0, 20)])
def test_stitching_keeps_the_last_prompt_positions(prompt_tokens, first):
    """A 20-token prompt in 4-row prefill records, then decoding from position 20: the sequence
    starts at the earliest prompt record needed to keep `prompt_tokens` positions."""
    st = Stitcher(max_tokens=64, prompt_tokens=prompt_tokens)
    st.add([_prompt_rec(i, 4 * i, 4) for i in range(5)])
    assert st.open_tokens == (20 if prompt_tokens < 0 else 0)  # held until the request decodes
    st.add([_rec(5, "p", 1, 20, 2, [1, 1, 0]), _rec(6, "p", 1, 23, 0, [0, -1, -1])])
    st.close_all()
    ((seq, _),) = st.take()
    assert seq.tokens.tolist() == [_tok(p) for p in range(first, 25)]


def test_a_request_that_ends_after_its_prompt_still_trains_on_it():
    st = Stitcher(max_tokens=64, prompt_tokens=6)
    st.add([_prompt_rec(i, 4 * i, 4) for i in range(3)])
    st.add([_rec(10 + i, "q", 7, 0, 3, [1, 1, 1]) for i in range(3)])  # others go on; "p" is quiet
    st.add([_rec(20 + i, "q", 7, 4 * i + 4, 3, [1, 1, 1]) for i in range(4)])
    st.close_all()
    starts = sorted(int(s.tokens[0]) - 100 for s, _ in st.take())
    assert 4 in starts  # p's last 8 prompt positions (4..11) became a sequence


def test_decode_steps_at_k0_are_trained_on_like_any_generated_position():
    """Adaptive K: decode steps at K = 0 carry no drafts but are generated positions, not prompt
    rows -- none of them is trimmed away with the prompt's older positions."""
    st = Stitcher(max_tokens=64, prompt_tokens=6)
    st.add([_prompt_rec(i, 4 * i, 4) for i in range(5)])  # prompt 0..19
    st.add([_undrafted_rec(5 + i, 20 + i, 1) for i in range(30)])  # 30 steps at K = 0: 20..49
    st.add([_rec(35, "p", 1, 50, 2, [1, 1, 0])])  # then a drafting step: 50..52
    st.add([_undrafted_rec(36 + i, 53 + i, 1) for i in range(5)])  # and K = 0 again: 53..57
    st.close_all()
    ((seq, _),) = st.take()
    assert seq.tokens.tolist() == [_tok(p) for p in range(12, 59)]  # the prompt records holding its last 6, then all


def test_a_request_quiet_with_an_open_segment_and_held_prompt_rows_closes_once():
    """Prompt rows held for a request that already decoded (a request prefilled again after its
    first decode steps) are flushed into its open segment when it goes quiet, closing it -- the
    quiet rule must not then close it a second time."""
    st = Stitcher(max_tokens=64, prompt_tokens=6)
    st.add([_rec(0, "p", 1, 10, 1, [1, 0, -1]), _prompt_rec(1, 12, 1), _prompt_rec(2, 13, 1)])
    st.add([_rec(10 + i, "q", 7, 4 * i, 3, [1, 1, 1]) for i in range(8)])  # "p" goes quiet here
    starts = sorted(int(s.tokens[0]) - 100 for s, _ in st.take())
    assert starts == [10]
    st.close_all()
    assert sorted(int(s.tokens[0]) - 100 for s, _ in st.take()) == [0]
