"""Issue 13, defect 1: the draft SGLang builds must have its target's dtype.

SGLang builds the draft's `ModelConfig` from the draft path with the server's `--dtype`; under
`auto` a head whose config says float32 resolves to float16 whatever the target's dtype, and the bf16
target's embedding is then shared into a float16 draft. Checked through SGLang's own `ModelConfig`
on a tiny bf16 Llama written to disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("sglang")

from safetensors import safe_open  # noqa: E402
from sglang.srt.configs.model_config import ModelConfig  # noqa: E402

from aurora_sgl import reference_head_path  # noqa: E402
from aurora_sgl.engine.draft_head import Eagle3Head  # noqa: E402
from aurora_sgl.launch_server import build_parser, resolve_defaults  # noqa: E402
from aurora_sgl.sglang_backend.launcher import build_server_args, day0_head, sglang_argv  # noqa: E402
from aurora_sgl.trainer.checkpoints import newest_checkpoint, save_checkpoint  # noqa: E402
from aurora_sgl.transport.weight_store import layout_of  # noqa: E402
from helpers import make_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def bf16_target(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("bf16_target") / "target"
    make_tiny_llama(300, layers=4).to(torch.bfloat16).save_pretrained(path)
    return str(path)


def _args(target: str, *extra: str):
    args, passthrough = build_parser().parse_known_args(["--backend", "sglang", "--model-path", target, *extra])
    resolve_defaults(args)
    return args, passthrough


def _sglang_dtypes(target: str, head: str, *extra: str) -> tuple[torch.dtype, torch.dtype]:
    """(target, draft) dtypes as SGLang's tp_worker resolves them from our server args."""
    args, passthrough = _args(target, *extra)
    sa = build_server_args(args, passthrough, head)
    draft = ModelConfig.from_server_args(sa, model_path=head, is_draft_model=True)
    return ModelConfig.from_server_args(sa).dtype, draft.dtype


def _file_dtypes(head_dir: str) -> set[torch.dtype]:
    with safe_open(str(Path(head_dir) / "model.safetensors"), "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()}


def test_day0_head_carries_the_targets_dtype_and_sglang_builds_both_alike(bf16_target, tmp_path):
    head = day0_head(bf16_target, str(tmp_path / "day0"), draft_vocab_size=128)
    assert json.loads((Path(head) / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert _file_dtypes(head) == {torch.bfloat16}
    assert _sglang_dtypes(bf16_target, head) == (torch.bfloat16, torch.bfloat16)


def test_a_float32_published_head_is_served_in_the_targets_dtype(bf16_target):
    # a head saved in float32 (as published heads and ours before the fix are): the launcher's
    # --dtype makes SGLang build it in the target's dtype
    assert json.loads((Path(reference_head_path()) / "config.json").read_text())["torch_dtype"] == "float32"
    assert _sglang_dtypes(bf16_target, reference_head_path()) == (torch.bfloat16, torch.bfloat16)


def test_a_dtype_the_user_gave_is_passed_once_and_wins(bf16_target, tmp_path):
    head = day0_head(bf16_target, str(tmp_path / "day0"), draft_vocab_size=128)
    args, passthrough = _args(bf16_target, "--dtype", "float16")
    assert sglang_argv(args, passthrough, head).count("--dtype") == 1
    assert _sglang_dtypes(bf16_target, head, "--dtype", "float16") == (torch.float16, torch.float16)


def test_trainer_checkpoints_are_saved_in_the_served_dtype(bf16_target, tmp_path):
    """The trainer trains in float32 and sets its head's dtype from the weight store's layout (what
    the engine serves): the checkpoint holds and declares that dtype and loads back."""
    from aurora_sgl.trainer.checkpoints import served_dtype

    head = Eagle3Head.load(reference_head_path(), torch.zeros(0))
    state = head.serving_state()
    served = {n: (t.to(torch.bfloat16) if t.is_floating_point() else t) for n, t in state.items()}
    head.config.dtype = served_dtype(layout_of(served))
    path = save_checkpoint(head, tmp_path / "ckpt", 3, {"steps": 3}, keep=2)
    assert _file_dtypes(str(path)) == {torch.bfloat16}
    assert newest_checkpoint(tmp_path / "ckpt") == str(path)
    back = Eagle3Head.load(path, torch.zeros(0))
    assert torch.equal(back.lm_head.weight, state["lm_head.weight"].to(torch.bfloat16).float())
    assert torch.equal(back.hot_ids, head.hot_ids)
    assert _sglang_dtypes(bf16_target, str(path), "--dtype", "auto") == (torch.bfloat16, torch.bfloat16)
    with pytest.raises(ValueError, match="dtypes"):
        served_dtype({"a": ((1,), torch.float32), "b": ((1,), torch.bfloat16)})
