"""Device check for a GPU box without network or sglang: `launch/device_check.sh` runs it.

    PYTHONPATH=. python -m aurora_sgl.device_check [--device cuda] [--quick] [--json OUT]

Four checks, one table:
  engine    the embedded engine on the device with the reference model and head: greedy outputs
            with speculation equal target-only outputs token for token; tau and speedup
  ipc       (CUDA only) a CUDA signal ring and a CUDA weight store shared with a second process
            through CUDA IPC (specs via spec_io): the child reads the records the parent wrote and
            publishes versions; the parent swaps each into live tensors on its own stream and times
            the pause (host: poll + enqueue; GPU: the copy) and checks the values
  capture   the SGLang plugin's capture staging (our VerifyStep, no sglang): exact rows, and on
            CUDA the in-step capture returns while the GPU is still busy (no host sync)
  trainer   the engine with online training, the trainer sidecar on the device: lossless while it
            trains and publishes, counters of steps / publishes / swaps

`--device cpu --quick` is the smoke mode CI runs so this script cannot rot; CUDA-only parts then
say "skipped: no CUDA". Needs torch >= 2.11 and transformers only (no sglang, no fastapi).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from aurora_sgl import reference_head_path, reference_model_path
from aurora_sgl.engine.draft_head import Eagle3Head
from aurora_sgl.engine.engine import Engine, StepRecord
from aurora_sgl.engine.sampling import SamplingParams

ROWS: list[tuple[str, str, str]] = []


def _prompts(tokenizer, n: int) -> list[list[int]]:
    rows = [json.loads(line) for line in open(os.path.join(reference_model_path(), "heldout_sample.jsonl"))]
    out = []
    for i in range(n):
        ids = tokenizer(rows[i % len(rows)]["text"], add_special_tokens=False)["input_ids"]
        start = (i // len(rows)) * 17
        out.append(ids[start : start + 16 + (i * 7) % 24])
    return out


def _timed_generate(engine: Engine, prompts, sp) -> tuple[list, float]:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = engine.generate(prompts, sp)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return res, time.perf_counter() - t0


def check_engine(device: str, quick: bool) -> tuple[Engine, list, list, SamplingParams]:
    n, new = (4, 12) if quick else (32, 64)
    base = Engine(num_speculative_steps=0, device=device, max_running_requests=8)
    prompts = _prompts(base.tokenizer, n)
    sp = SamplingParams(max_new_tokens=new)
    if not quick:
        _timed_generate(base, prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up
    ref, t_base = _timed_generate(base, prompts, sp)
    spec = Engine(
        num_speculative_steps=4,
        draft_model_path=reference_head_path(),
        device=device,
        max_running_requests=8,
        model=base.target.hf,
        tokenizer=base.tokenizer,
    )
    if not quick:
        _timed_generate(spec, prompts[:2], SamplingParams(max_new_tokens=4))
    out, t_spec = _timed_generate(spec, prompts, sp)
    bad = sum(o["output_ids"] != r["output_ids"] for o, r in zip(out, ref))
    tau = sum(o["meta_info"]["spec_accept_length"] for o in out) / len(out)
    ROWS.append(
        (
            "engine lossless (T=0, K=4)",
            "PASS" if bad == 0 else "FAIL",
            f"{n} prompts x {new} tok, {bad} differ; tau {tau:.2f}, speedup {t_base / t_spec:.2f}x",
        )
    )
    return base, prompts, [r["output_ids"] for r in ref], sp


# ---- CUDA IPC: ring and weight store across two processes ---------------------------------------
def _record(i: int, k: int, aux: int, hidden: int, device) -> StepRecord:
    n = 1 + i % (k + 1)
    f = torch.full
    return StepRecord(
        request_id=f"r{i % 4}",
        position=i,
        draft_tokens=f((k,), i, dtype=torch.long, device=device),
        target_tokens=f((k,), i, dtype=torch.long, device=device),
        outcome=f((k,), 1, dtype=torch.int8, device=device),
        num_accepted=n - 1,
        committed=[],
        input_tokens=f((n,), i, dtype=torch.long, device=device),
        next_tokens=f((n,), i + 1, dtype=torch.long, device=device),
        aux_hidden=f((n, aux), float(i), device=device),
        final_hidden=f((n, hidden), -float(i), device=device),
        draft_version=1,
    )


def ipc_child(spec_path: str, versions: int) -> int:
    """The trainer's side: read the ring, publish `versions` versions (version v filled with v)."""
    from aurora_sgl.transport.handoff import read_handoff
    from aurora_sgl.transport.signal_ring import SignalRing
    from aurora_sgl.transport.weight_store import WeightStore

    spec = read_handoff(spec_path)
    ring, store = SignalRing.attach(spec["ring"]), WeightStore.attach(spec["store"])
    got = []
    deadline = time.monotonic() + 60
    while len(got) < spec["records"] and time.monotonic() < deadline:
        got += ring.read(256)
    ok = len(got) == spec["records"] and all(
        float(r.aux_hidden.sum()) == r.seq * r.aux_hidden.numel() and int(r.next_tokens[0]) == r.seq + 1 for r in got
    )
    state = {n: torch.zeros(s, dtype=d, device=store.device) for n, (s, d) in store.layout.items()}
    for v in range(2, versions + 2):  # version 1 is the parent's
        for t in state.values():
            t.fill_(v)
        store.publish(state)
        time.sleep(0.02)
    print(json.dumps({"ring_ok": ok, "records": len(got)}), flush=True)
    ring.close()
    store.close()
    return 0


def check_ipc(device: str, quick: bool) -> None:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        ROWS.append(("CUDA IPC ring + weight store (2 procs)", "skipped", "no CUDA"))
        return
    from aurora_sgl.transport.handoff import write_handoff
    from aurora_sgl.transport.signal_ring import SignalRing
    from aurora_sgl.transport.weight_store import WeightStore, layout_of

    head = Eagle3Head.load(reference_head_path(), torch.zeros(0), device=device)
    params = list(head.serving_state().values())
    layout = layout_of(head.serving_state())
    k, aux, hidden, records, versions = 4, 768, 256, 64, (10 if quick else 50)
    ring = SignalRing.create("aurora_check_ring", 128, k + 1, aux, hidden, k, device=device)
    store = WeightStore.create("aurora_check_store", layout, device=device)
    store.publish(head.serving_state())
    d = tempfile.mkdtemp(prefix="aurora_check_")
    path = os.path.join(d, "spec.json")
    write_handoff({"ring": ring.spec(), "store": store.spec(), "records": records}, path)
    ring.write_many([_record(i, k, aux, hidden, device) for i in range(records)])
    child = subprocess.Popen(
        [sys.executable, "-m", "aurora_sgl.device_check", "--ipc-child", path, "--versions", str(versions)],
        stdout=subprocess.PIPE,
        text=True,
    )
    stream = torch.cuda.Stream(device)
    host_us, gpu_us, wrong, version = [], [], 0, 1
    deadline = time.monotonic() + 120
    while version < versions + 1 and time.monotonic() < deadline:
        polled = store.poll(version)
        if polled is None:
            if child.poll() is not None:
                break
            time.sleep(0.001)
            continue
        v = polled[0]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            start.record()
            ok = store.copy_into(params, v, stream=stream)
            end.record()
        host_us.append((time.perf_counter() - t0) * 1e6)
        end.synchronize()
        gpu_us.append(start.elapsed_time(end) * 1e3)
        if ok:
            version = v
            wrong += sum(bool((p != v).any()) for p in params if p.is_floating_point())
    out, _ = child.communicate(timeout=60)
    res = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"ring_ok": False, "records": 0}
    ring.close()
    store.close()
    for name in os.listdir(d):
        os.remove(os.path.join(d, name))
    os.rmdir(d)
    ROWS.append(
        (
            "CUDA IPC signal ring (2 procs)",
            "PASS" if res["ring_ok"] else "FAIL",
            f"{res['records']}/{records} records read intact by the child",
        )
    )
    swaps = len(gpu_us)
    ok = swaps >= 1 and wrong == 0 and version == versions + 1
    detail = (
        (
            f"{swaps} swaps to v{version}/{versions + 1}, {wrong} wrong tensors; pause host p50 "
            f"{statistics.median(host_us):.0f} us p99 {sorted(host_us)[int(0.99 * (swaps - 1))]:.0f} us, "
            f"GPU copy p50 {statistics.median(gpu_us):.0f} us"
        )
        if swaps
        else "no swap happened"
    )
    ROWS.append(("CUDA IPC weight store swap", "PASS" if ok else "FAIL", detail))


# ---- the SGLang plugin's capture staging (no sglang needed: VerifyStep is ours) ------------------
def check_capture(device: str) -> None:
    """CaptureStaging (verify) and PrefillStaging (prompt rows) on the device: rows land exactly,
    prompt records before the decode records of the step after; on CUDA the in-step captures must
    not wait for the GPU (they return while a long kernel still runs) and the drain skips
    unfinished slots."""
    from aurora_sgl.transport.signal_ring import SignalRing

    from .sglang_backend.capture import CaptureStaging, Sequencer, VerifyStep, drain_in_order
    from .sglang_backend.prefill import PrefillStaging, PrefillStep

    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    bs, steps, d, hdim = 16, 5, 6, 256
    adim = 3 * hdim
    acc = torch.randint(1, steps + 2, (bs,), generator=g)
    accept_index = torch.tensor([[i * d + j if j < acc[i] else -1 for j in range(steps + 1)] for i in range(bs)])
    draft = torch.randint(0, 6000, (bs * d,), generator=g)
    predict = torch.randint(0, 6000, (bs * d,), generator=g)
    aux, final = torch.randn(bs * d, adim, generator=g), torch.randn(bs * d, hdim, generator=g)
    step = VerifyStep(
        request_ids=[f"r{i}" for i in range(bs)],
        positions=list(range(bs)),
        root_tokens=draft.view(bs, d)[:, 0].to(dev),
        draft_tokens=draft.view(bs, d).to(dev),
        predict=predict.to(dev),
        accept_lens=acc.to(dev),
        accept_index=accept_index.to(dev),
        aux_hidden=aux.to(dev),
        final_hidden=final.to(dev),
        topk=1,
    )
    plens = [40, 17, 3]  # prompt rows of three requests (one prefill batch)
    n = sum(plens)
    p_ids, p_aux, p_final = (
        torch.randint(0, 6000, (n + 1,), generator=g),
        torch.randn(n, adim, generator=g),
        torch.randn(n, hdim, generator=g),
    )
    pstep = PrefillStep(
        [f"p{i}" for i in range(3)],
        [0, 5, 0],
        plens,
        p_ids[:n].to(dev),
        p_ids[1:].to(dev),
        p_aux.to(dev),
        p_final.to(dev),
    )
    order = Sequencer()
    staging = CaptureStaging(64, steps, adim, hdim, device=dev, sequencer=order)
    prefill = PrefillStaging(256, steps, adim, hdim, device=dev, sequencer=order)
    ring = SignalRing.create("aurora_check_capture", 128, steps + 1, adim, hdim, steps)
    reader = SignalRing.attach(ring.spec())
    cuda = dev.type == "cuda"
    side = torch.cuda.Stream(dev) if cuda else None
    no_wait = "n/a on cpu"
    try:
        if cuda:
            x = torch.randn(4096, 4096, device=dev)
            torch.cuda.synchronize()
            for _ in range(200):  # ~ tens of ms of GPU work queued ahead of the capture
                x = x @ x
                x = x / x.norm()
        t0 = time.perf_counter()
        prefill.capture(pstep)
        staging.capture(step)
        enqueue_us = (time.perf_counter() - t0) * 1e6
        if cuda:
            busy = not staging.slots[0].ready.query() and not prefill.slots[0].ready.query()
            early = drain_in_order([staging, prefill], ring, side)
            no_wait = f"returned while GPU busy: {busy}, drained early: {early}"
            torch.cuda.synchronize()
        drain_in_order([staging, prefill], ring, side)
        if cuda:
            side.synchronize()
        precs = reader.read(128)
        per = steps + 1
        n_prefill = sum((m + per - 1) // per for m in plens)
        precs, recs = precs[:n_prefill], precs[n_prefill:]
        ok = (
            all(r.request_id.startswith("p") for r in precs)
            and torch.equal(torch.cat([r.aux_hidden for r in precs]), p_aux)
            and torch.equal(torch.cat([r.next_tokens for r in precs]), p_ids[1:])
            and torch.equal(torch.cat([r.final_hidden for r in precs]), p_final)
        )
        ok = (
            ok
            and len(recs) == bs
            and all(
                torch.equal(r.aux_hidden, aux[i * d : i * d + int(acc[i])])
                and torch.equal(r.final_hidden, final[i * d : i * d + int(acc[i])])
                and torch.equal(r.next_tokens, predict[i * d : i * d + int(acc[i])])
                for i, r in enumerate(recs)
            )
        )
        if cuda:
            ok = ok and "busy: True" in no_wait and "early: 0" in no_wait
    finally:
        reader.close()
        ring.close()
    ROWS.append(
        (
            "sglang capture staging",
            "PASS" if ok else "FAIL",
            f"{n} prompt rows + {bs} verify requests exact, in order: {ok}; "
            f"both enqueues {enqueue_us:.0f} us; {no_wait}",
        )
    )


# ---- trainer on the device ------------------------------------------------------------------------
def check_trainer(device: str, quick: bool, base: Engine, prompts, ref, sp: SamplingParams) -> None:
    from aurora_sgl.online.sidecar import OnlineTraining

    engine = Engine(
        num_speculative_steps=4,
        device=device,
        max_running_requests=8,
        model=base.target.hf,
        tokenizer=base.tokenizer,
        seed=3,
    )  # random head: training has something to learn
    cfg = {"lr": 1e-3, "tokens_per_step": 16 if quick else 256, "publish_every": 1, "holdout_fraction": 0.0}
    online = OnlineTraining(engine, model_path=reference_model_path(), trainer_device=device, trainer_config=cfg)
    online.start()
    try:
        alive = online.wait_for_trainer(180)
        waves = 1 if quick else 12
        bad, t0 = 0, time.monotonic()
        for w in range(waves):
            out = engine.generate(prompts, sp)
            bad += sum(o["output_ids"] != r for o, r in zip(out, ref))
            if not quick and online.flywheel.swaps >= 2 and w >= 6:
                break
        st = online.trainer_state()
        fw = online.flywheel.stats()
    finally:
        online.close()
    learned = st["train_steps"] >= 1 and st["publishes"] >= 1 and fw["swaps"] >= 1
    ok = alive and bad == 0 and (learned or quick)
    ROWS.append(
        (
            f"trainer on {device} + live swaps",
            "PASS" if ok else "FAIL",
            f"{bad} outputs differ; trainer steps {st['train_steps']}, publishes {st['publishes']}, "
            f"engine swaps {fw['swaps']}, {time.monotonic() - t0:.0f} s",
        )
    )


def print_table() -> None:
    w0 = max(len(r[0]) for r in ROWS)
    w1 = max(len(r[1]) for r in ROWS)
    print(f"{'check'.ljust(w0)}  {'result'.ljust(w1)}  detail")
    for name, result, detail in ROWS:
        print(f"{name.ljust(w0)}  {result.ljust(w1)}  {detail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aurora_sgl.device_check")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes (the CPU smoke mode)")
    ap.add_argument("--json", default=None, help="also write the table as JSON here")
    ap.add_argument("--ipc-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--versions", type=int, default=10, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ipc_child:
        return ipc_child(args.ipc_child, args.versions)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    torch.set_num_threads(1 if args.quick else max(1, min(4, os.cpu_count() or 1)))
    t0 = time.monotonic()
    base, prompts, ref, sp = check_engine(args.device, args.quick)
    check_ipc(args.device, args.quick)
    check_capture(args.device)
    check_trainer(args.device, args.quick, base, prompts, ref, sp)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    ROWS.append(("total", "", f"{time.monotonic() - t0:.0f} s on {dev}, torch {torch.__version__}"))
    print_table()
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(zip(("check", "result", "detail"), r)) for r in ROWS], f, indent=2)
    return 0 if all(r[1] != "FAIL" for r in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
