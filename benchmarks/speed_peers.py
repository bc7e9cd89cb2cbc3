"""Peers for benchmarks/speed.py: transformers' own decoding (plain greedy, assisted generation with
a small draft LM, prompt-lookup decoding), and our engine's online-trained head after a warm-up.

transformers runs one request at a time (batch 1); assisted and prompt-lookup decoding are batch-1
only there. Every call returns the generated ids (EOS trimmed) so speed.py can compare them token by
token with plain greedy.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

ASSISTED_DEFAULTS = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")


@contextmanager
def count_forwards(model):
    """Counts calls of `model.forward` (one per target pass: prefill, plain step, or verify)."""
    calls = [0]
    handle = model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def encode_like_engine(tokenizer, prompt: str) -> torch.Tensor:
    # Chat prompts are rendered with the BOS already in the text; plain ones get it from the tokenizer.
    return tokenizer(
        prompt, return_tensors="pt", add_special_tokens=not prompt.startswith(tokenizer.bos_token)
    ).input_ids


def run_hf(model, tokenizer, prompts, max_new, **generate_kwargs) -> dict:
    """transformers `generate`, greedy, one prompt at a time. `generate_kwargs` selects the method:
    nothing (plain), `assistant_model=` (assisted generation) or `prompt_lookup_num_tokens=`.
    `tokens_per_target_forward` is HF's analogue of tau: generated tokens over target passes (plain
    greedy: exactly 1)."""
    outs, tokens = [], 0
    with count_forwards(model) as calls, torch.no_grad():
        t0 = time.perf_counter()
        for p in prompts:
            ids = encode_like_engine(tokenizer, p)
            g = model.generate(
                ids, max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id, **generate_kwargs
            )
            seq = g[0, ids.shape[1] :].tolist()
            if tokenizer.eos_token_id in seq:  # kept as the last token, as the engine and SGLang do
                seq = seq[: seq.index(tokenizer.eos_token_id) + 1]
            outs.append(seq)
            tokens += len(seq)
        dt = time.perf_counter() - t0
    return {"outputs": outs, "tok_s": tokens / dt, "tokens_per_target_forward": tokens / max(1, calls[0])}


def load_draft_lm(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    draft = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return draft


def assisted_settings(draft) -> dict:
    """The assisted-generation knobs transformers uses: the draft's generation config where set,
    else transformers' global defaults (resolved the way its candidate generator does)."""
    cfg = draft.generation_config
    defaults = cfg._get_default_generation_params() if hasattr(cfg, "_get_default_generation_params") else {}
    return {
        k: getattr(cfg, k, None) if getattr(cfg, k, None) is not None else defaults.get(k) for k in ASSISTED_DEFAULTS
    }


def warm_up_online(
    engine, prompts, max_new, *, model_path, init_head, wave: int, trainer_config=None, trainer_threads: int = 1
) -> dict:
    """Serve `prompts` (the warm-up traffic) on `engine` with the real trainer sidecar learning from
    them and the flywheel hot-swapping its versions in, then stop the trainer. The engine keeps the
    last version it swapped in: the measurement that follows uses that head *frozen*, so the
    trainer's CPU use does not land in the timings of any system."""
    from aurora_sgl.engine.sampling import SamplingParams
    from aurora_sgl.online.sidecar import OnlineTraining

    online = OnlineTraining(
        engine,
        model_path=model_path,
        init_head=init_head,
        trainer_config=trainer_config,
        trainer_threads=trainer_threads,
    )
    online.start()
    taus = []
    t0 = time.perf_counter()
    try:
        # The first heartbeat comes early in the trainer's setup; it has loaded everything once it
        # reports the served version (1) as its last published one.
        if not _wait(lambda: online.trainer_state().get("last_published_version", 0) >= 1, 180):
            raise RuntimeError("the trainer sidecar did not finish its setup within 180 s")
        engine.max_running = wave
        for w in range(0, len(prompts), wave):
            res = engine.generate(prompts[w : w + wave], SamplingParams(max_new_tokens=max_new))
            taus += [o["meta_info"]["spec_accept_length"] for o in res if o["meta_info"]["spec_verify_ct"]]
        # Let the trainer finish what the warm-up gave it, then take its newest version through the
        # flywheel's own between-steps hook, as the next request would.
        _wait_quiet(online, quiet_s=4.0, timeout_s=120)
        engine.before_step(engine)
        state = online.trainer_state()
    finally:
        online.close()
    first, last = taus[:wave], taus[-wave:]
    return {
        "warmup_requests": len(prompts),
        "warmup_seconds": round(time.perf_counter() - t0, 1),
        "init": "offline head" if init_head else "random (day-0)",
        "measured": "frozen after warm-up",
        "draft_version": engine.draft_version,
        "swaps": online.flywheel.swaps,
        "trainer_steps": int(state.get("train_steps", 0)),
        "publishes": int(state.get("publishes", 0)),
        "refused": int(state.get("refused", 0)),
        "tau_first_wave": round(sum(first) / max(1, len(first)), 3),
        "tau_last_wave": round(sum(last) / max(1, len(last)), 3),
    }


def _wait(cond, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def _wait_quiet(online, quiet_s: float, timeout_s: float) -> None:
    """Until the trainer's records-read and step counters stay unchanged for `quiet_s`."""

    def counters():
        st = online.trainer_state()
        return st.get("records_read"), st.get("train_steps"), st.get("publishes")

    last, since = counters(), time.monotonic()
    deadline = since + timeout_s
    while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
        time.sleep(0.2)
        now = counters()
        if now != last:
            last, since = now, time.monotonic()
