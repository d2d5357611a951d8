"""Export end to end: safetensors and Hugging Face directories from real ZeRO-2 checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from scalegpt.model import GPT, ModelConfig
from scalegpt.train.checkpoint import checkpoint_dir, checkpoint_root
from scalegpt.train.config.schema import Config, to_yaml
from scalegpt.train.weights import consolidated_state_dict, load_for_inference

from e2e import scalegpt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(reference_runs) -> Path:  # noqa: ANN001
    return reference_runs(2)  # a 2-rank ZeRO-2 run: its fp32 weights are split over two files


def test_safetensors_export_holds_the_gathered_weights(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "st"
    scalegpt("export", str(run), "--format", "safetensors", str(out))
    exported = load_file(str(out / "model.safetensors"))
    gathered = consolidated_state_dict(checkpoint_dir(run, 10))
    assert exported.keys() == gathered.keys()
    assert all(torch.equal(exported[k], gathered[k]) for k in exported)
    assert (out / "config.yaml").is_file() and (out / "tokenizer.json").is_file()
    # and the export directory is itself something sample/eval/export accept
    again = tmp_path / "again"
    scalegpt("export", str(out), "--format", "safetensors", str(again))
    assert torch.equal(
        load_file(str(again / "model.safetensors"))["transformer.wte.weight"], exported["transformer.wte.weight"]
    )


def test_hf_export_loads_offline_with_the_same_logits(run: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    proc = scalegpt("export", str(checkpoint_dir(run, 10)), "--format", "hf", str(out))
    assert "verified" in proc.stdout
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(out), local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    ours, our_tok, _ = load_for_inference(run, device="cpu")
    text = "Q: What is 12 plus 7? A: 19"
    ids = tok(text)["input_ids"]
    assert ids == our_tok.encode(text).ids
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x)[0], atol=1e-5, rtol=0)
    assert tok.eos_token == "<|endoftext|>" and theirs.config.eos_token_id == our_tok.token_to_id("<|endoftext|>")


def test_deepspeed_zero_to_fp32_works_on_our_checkpoints(run: Path, tmp_path: Path) -> None:
    script = checkpoint_root(run) / "zero_to_fp32.py"
    assert script.is_file()  # DeepSpeed copies it beside every save
    subprocess.run(
        [sys.executable, str(script), str(checkpoint_root(run)), str(tmp_path / "fp32"), "--safe_serialization"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    files = list((tmp_path / "fp32").glob("*.safetensors"))
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    ours = consolidated_state_dict(checkpoint_dir(run, 10))
    assert all(torch.equal(state[k], ours[k]) for k in ours)


def _scalegpt_export_dir(path: Path, model: GPT, cfg: Config) -> Path:
    """An export directory as `export --format safetensors` writes it, around `model`."""
    from tokenizers import Tokenizer, models

    path.mkdir()
    save_file(model.state_dict(), str(path / "model.safetensors"))
    (path / "config.yaml").write_text(to_yaml(cfg))
    tok = Tokenizer(models.BPE())
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path / "tokenizer.json"))
    return path


def test_alternating_attention_exports_to_gpt_neo(tmp_path: Path) -> None:
    """GPT-3's alternating layers become GPTNeoForCausalLM: the CLI verifies logits and greedy decoding
    itself, and the folder loads offline with our logits on tokens beyond the local window."""
    transformers = pytest.importorskip("transformers")
    cfg = Config(
        model=ModelConfig(
            n_layer=3, n_head=2, d_model=32, n_ctx=16, vocab_size=50, attention="alternating", local_window=4
        )
    )
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    with torch.no_grad():
        for block in model.transformer.h:  # key and value biases fold away; the query bias stays zero
            block.attn.c_attn.bias[32:].normal_()
    src = _scalegpt_export_dir(tmp_path / "alt", model, cfg)
    proc = scalegpt("export", str(src), "--format", "hf", str(tmp_path / "neo"))
    assert "GPTNeoForCausalLM" in proc.stdout and "verified" in proc.stdout and "greedy decoding equal" in proc.stdout
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "neo"), local_files_only=True).eval()
    assert type(theirs).__name__ == "GPTNeoForCausalLM" and theirs.config.window_size == 4
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, model(x)[0], atol=1e-5, rtol=0)
    # and back: sample, eval and init_from read the GPT-Neo folder as the model it came from
    back, _, back_cfg = load_for_inference(tmp_path / "neo", device="cpu")
    assert (back_cfg.model.attention, back_cfg.model.local_window, back_cfg.model.qkv_bias) == ("alternating", 4, False)
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], model(x)[0], atol=1e-5, rtol=0)
    neo = str(tmp_path / "neo")
    shown = scalegpt("train", "smoke", "--dry-run", f"model.init_from={neo}", f"data.tokenizer={neo}").stdout
    assert "  attention: alternating\n" in shown and "  n_layer: 3\n" in shown and "  qkv_bias: false\n" in shown


def test_a_query_bias_cannot_become_gpt_neo(tmp_path: Path) -> None:
    cfg = Config(
        model=ModelConfig(
            n_layer=2, n_head=2, d_model=32, n_ctx=16, vocab_size=50, attention="alternating", local_window=4
        )
    )
    model = GPT(cfg.model)
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.bias[:32].fill_(0.1)
    src = _scalegpt_export_dir(tmp_path / "alt", model, cfg)
    proc = scalegpt("export", str(src), "--format", "hf", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("scalegpt: error: cannot export to Hugging Face:")
    assert "query bias" in proc.stderr and "model.qkv_bias=false" in proc.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_export_never_overwrites(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = scalegpt("export", str(run), "--format", "safetensors", str(out), check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    proc = scalegpt("export", str(tmp_path / "nope"), "--format", "hf", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("scalegpt: error:")
