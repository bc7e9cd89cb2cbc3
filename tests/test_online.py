"""The whole flywheel on the reference model: engine + ring + real trainer sidecar + weight store.
Day-0 learning from a random head, SIGKILL of the trainer, and shared-memory hygiene."""

import json
import os
import signal
import stat
import time

from server_utils import ServerProcess

from aurora_sgl import reference_head_path, reference_model_path
from aurora_sgl.engine import Engine
from aurora_sgl.online import OnlineTraining
from aurora_sgl.sampling import SamplingParams

MAX_NEW = 48
WAVE = 8


def _code_prompts(tok, n):
    rows = [json.loads(line) for line in open(f"{reference_model_path()}/heldout_sample.jsonl")]
    text = next(r["text"] for r in rows if r["domain"] == "code")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    step = max(1, (len(ids) - 40) // n)
    return [ids[i * step:i * step + 16 + (i % 5) * 4] for i in range(n)]


def test_day0_learns_stays_exact_and_survives_trainer_sigkill(ref_tokenizer, tmp_path):
    prompts = _code_prompts(ref_tokenizer, 216)
    base = Engine(num_speculative_steps=0, max_running_requests=WAVE)
    sp = SamplingParams(max_new_tokens=MAX_NEW)
    reference = [o["output_ids"] for o in base.generate(prompts, sp)]

    engine = Engine(num_speculative_steps=4, max_running_requests=WAVE, model=base.target.hf,
                    tokenizer=base.tokenizer, seed=3)  # random head: day 0
    online = OnlineTraining(engine, model_path=reference_model_path(), checkpoint_dir=str(tmp_path / "ckpt"),
                            trainer_config={"lr": 1e-3, "tokens_per_step": 512, "publish_every": 2,
                                            "checkpoint_every": 1})
    online.start()
    try:
        assert online.wait_for_trainer(120)
        taus, outs = [], []
        for w in range(0, 200, WAVE):
            res = engine.generate(prompts[w:w + WAVE], sp)
            outs += [o["output_ids"] for o in res]
            taus += [o["meta_info"]["spec_accept_length"] for o in res]
        assert outs == reference[:200]  # lossless throughout, whatever the trainer published
        start, end = sum(taus[:32]) / 32, sum(taus[-32:]) / 32
        assert engine.draft_version > 1 and online.flywheel.swaps >= 1
        assert end >= start + 0.3, (start, end)  # clearly learned: +0.3 tokens per verify step

        # SIGKILL the trainer mid-stream: requests complete with the last good weights ...
        os.kill(online.trainer_pid, signal.SIGKILL)
        version = engine.draft_version
        res = engine.generate(prompts[200:216], sp)
        assert [o["output_ids"] for o in res] == reference[200:216]
        assert engine.draft_version == version or online.restarts >= 1
        # ... and the supervisor restarts it from the newest checkpoint.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (online.restarts and online.trainer_state()["alive"]):
            time.sleep(0.2)
        assert online.restarts == 1 and online.trainer_state()["alive"]
        assert any(p.name.startswith("step_") for p in (tmp_path / "ckpt").iterdir())
    finally:
        online.close()


def test_injected_nan_and_random_versions_cost_nothing(ref_tokenizer, tmp_path):
    """The trainer publishes NaN, then random weights (guardrail bypassed so the engine sees them):
    the engine refuses the NaN version, rolls the random one back, outputs never change and the
    accept length comes back."""
    prompts = _code_prompts(ref_tokenizer, 96)
    base = Engine(num_speculative_steps=0, max_running_requests=WAVE)
    sp = SamplingParams(max_new_tokens=MAX_NEW)
    reference = [o["output_ids"] for o in base.generate(prompts, sp)]
    engine = Engine(num_speculative_steps=4, max_running_requests=WAVE, model=base.target.hf,
                    tokenizer=base.tokenizer, draft_model_path=reference_head_path())
    online = OnlineTraining(engine, model_path=reference_model_path(), init_head=reference_head_path(),
                            trainer_config={"tokens_per_step": 256, "publish_every": 8,
                                            "inject": ["nan@1", "random@2"], "inject_bypass_guardrail": True})
    online.start()
    try:
        assert online.wait_for_trainer(120)
        taus, outs = [], []
        for w in range(0, len(prompts), WAVE):
            res = engine.generate(prompts[w:w + WAVE], sp)
            outs += [o["output_ids"] for o in res]
            taus += [o["meta_info"]["spec_accept_length"] for o in res]
            if online.flywheel.rollbacks and w >= 48:
                break
        assert outs == reference[:len(outs)]
        fw = online.flywheel
        assert fw.refused >= 1 and fw.rollbacks >= 1, fw.stats()
        start, end = sum(taus[:WAVE]) / WAVE, sum(taus[-WAVE:]) / WAVE
        assert end > start - 0.3, (start, end)  # recovered: the last wave drafts like the first
    finally:
        online.close()


def test_server_segments_are_private_and_removed_on_sigterm():
    s = ServerProcess("--speculative-num-steps", "2", "--online")
    try:
        mine = [f for f in os.listdir("/dev/shm") if f"_{s.proc.pid}_" in f]
        assert len(mine) == 3, mine  # ring, weight store, trainer status
        for f in mine:
            assert stat.S_IMODE(os.stat(f"/dev/shm/{f}").st_mode) == 0o600
    finally:
        s.stop(signal.SIGTERM)
    assert not [f for f in os.listdir("/dev/shm") if f"_{s.proc.pid}_" in f]
