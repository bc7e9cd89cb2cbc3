"""SGLang 0.5.23 backend: a plugin (entry point `sglang.srt.plugins`) that hooks SGLang's EAGLE-3
worker, plus the launcher that starts SGLang's server and our trainer sidecar.

    capture.py   verify outputs -> device staging -> StepRecords for the signal ring (torch only)
    prefill.py   prompt rows of extend batches -> device staging, like capture.py
    swap.py      weight-store tensors -> SGLang's draft parameters, in place (torch only)
    replica.py   what each DP replica / TP rank creates: stagings, its ring, the handoff it writes
    plugin.py    the hooks and the per-scheduler runtime (imports sglang lazily)
    launcher.py  `launch_server --backend sglang`: ServerArgs, day-0 head, trainer sidecar

Nothing here is imported by the engine, ring, store or trainer.
"""
