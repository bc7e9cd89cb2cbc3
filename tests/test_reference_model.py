"""The built-in reference target model: offline loading, determinism, held-out loss, per-domain
behaviour, draft/target cost, and the training script's data-path check."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aurora_sgl import reference_model_path

REPO = Path(__file__).resolve().parents[1]
MODEL = Path(reference_model_path())


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


def test_loads_offline_in_a_fresh_process():
    code = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(MODEL)!r}); t = AutoTokenizer.from_pretrained({str(MODEL)!r})\n"
        "print(m.config.model_type, len(t))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "llama"


def test_size_and_tokenizer(ref_tokenizer):
    assert (MODEL / "model.safetensors").stat().st_size <= 40e6
    cfg = json.loads((MODEL / "config.json").read_text())
    assert 4000 <= cfg["vocab_size"] <= 8200 and cfg["architectures"] == ["LlamaForCausalLM"]
    chat = ref_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|bos|><|user|>\nhi\n<|assistant|>\n"
    ids = ref_tokenizer("hello")["input_ids"]
    assert ids[0] == ref_tokenizer.bos_token_id


def _greedy(model, tok, prompt, n=32):
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_greedy_is_deterministic_and_domains_differ(model, ref_tokenizer):
    stats = json.loads((MODEL / "training_stats.json").read_text())
    outs = {d: _greedy(model, ref_tokenizer, p) for d, p in stats["prompts"].items()}
    again = {d: _greedy(model, ref_tokenizer, p) for d, p in stats["prompts"].items()}
    assert outs == again
    assert len(set(outs.values())) == 3


def test_heldout_loss_below_stated_bound(model, ref_tokenizer):
    stats = json.loads((MODEL / "training_stats.json").read_text())
    bounds = stats["heldout_loss_bounds"]
    rows = [json.loads(line) for line in (MODEL / "heldout_sample.jsonl").read_text().splitlines()]
    for row in rows:
        ids = ref_tokenizer(row["text"], add_special_tokens=False, return_tensors="pt").input_ids[:, :1024]
        with torch.no_grad():
            logits = model(ids).logits
        loss = F.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
        assert loss < bounds[row["domain"]], (row["domain"], loss)
        assert loss < 5.5  # far from an untrained model (ln 6144 = 8.7)


def test_draft_step_is_at_most_a_quarter_of_target_flops(model):
    from aurora_sgl.engine.draft_head import Eagle3Config
    from aurora_sgl.engine.engine import DEFAULT_DRAFT_VOCAB

    c = model.config
    h, i, lay = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    hd = h // c.num_attention_heads
    kv = c.num_key_value_heads * hd
    target = lay * (h * (h + 2 * kv) + h * h + 3 * h * i) + h * c.vocab_size
    d = Eagle3Config.for_target(c, DEFAULT_DRAFT_VOCAB)
    draft = 3 * h * h + 2 * h * (h + 2 * kv) + h * h + 3 * h * d.intermediate_size + h * d.draft_vocab_size
    assert draft / target <= 0.25, draft / target


def test_training_script_rejects_missing_dataset_dir(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "reference" / "train_target.py"),
            "--data-dir",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "m"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "not found" in lines[0] and "nope" in lines[0]
