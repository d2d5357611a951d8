"""`scalegpt sample` end to end, and the loading it rests on (train/weights.py): run, checkpoint and
export directories, a real one-process DeepSpeed ZeRO-2 checkpoint, bad input of every kind."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import ByteLevelBPETokenizer, Tokenizer

from scalegpt.launch.cli import main
from scalegpt.launch.sample import TextStream
from scalegpt.model import GPT, ModelConfig
from scalegpt.model.generate import generate
from scalegpt.model.hf import hf_config, to_hf_state_dict
from scalegpt.train.checkpoint import LATEST, checkpoint_dir, checkpoint_root, tag_for, write_latest
from scalegpt.train.config.schema import Config, to_yaml
from scalegpt.train.errors import UserError
from scalegpt.train.osutil import free_port
from scalegpt.train.weights import consolidated_state_dict, load_for_inference, resolve

from eval_helpers import varied_weights

CORPUS = [
    "the quick brown fox jumps over the lazy dog, and the dog sleeps on.",
    "héllo wörld, naïve café: déjà vu — 日本語のテキスト 🙂 ünïcödé everywhere.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind.",
] * 30
MODEL = dict(n_layer=2, n_head=2, d_model=32, n_ctx=32, vocab_size=320)

# Runs in a fresh interpreter so DeepSpeed's process group does not leak into other tests.
MAKE_CHECKPOINT = textwrap.dedent(
    """
    import sys, torch, deepspeed
    from scalegpt.model import GPT, ModelConfig
    from scalegpt.train.checkpoint import tag_for
    run, model_kwargs = sys.argv[1], eval(sys.argv[2])
    torch.manual_seed(0)
    model = GPT(ModelConfig(**model_kwargs))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    x = torch.randint(0, model.config.vocab_size, (1, model.config.n_ctx))
    engine.backward(engine(x, x)[1])
    engine.step()  # so the fp32 master weights are no longer the initial ones
    engine.save_checkpoint(run + "/checkpoints", tag=tag_for(1), save_latest=False)
    torch.save(engine.module.state_dict(), run + "/expected.pt")
    config["zero_optimization"]["stage"] = 0  # and one without ZeRO partitions
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.save_checkpoint(run + "/stage0", tag=tag_for(1), save_latest=False)
    """
)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(
        CORPUS,
        vocab_size=MODEL["vocab_size"],
        min_frequency=1,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def write_export(out: Path, state: dict[str, torch.Tensor], tokenizer_file: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    (out / "config.yaml").write_text(to_yaml(Config(model=ModelConfig(**MODEL))))
    shutil.copy(tokenizer_file, out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_file: Path) -> Path:
    model = varied_weights(GPT(ModelConfig(**MODEL)))
    return write_export(tmp_path_factory.mktemp("export"), model.state_dict(), tokenizer_file)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_file: Path) -> Path:
    """A run directory holding a real DeepSpeed ZeRO-2 checkpoint, laid out as the trainer writes it."""
    run = tmp_path_factory.mktemp("run")
    port = free_port()
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    done = subprocess.run(
        [sys.executable, "-c", MAKE_CHECKPOINT, str(run), repr(MODEL)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = checkpoint_dir(run, 1)
    (checkpoint_root(run) / LATEST).write_text(tag_for(1) + "\n")  # by hand, with a newline: it is stripped
    (run / "config.yaml").write_text(to_yaml(Config(model=ModelConfig(**MODEL))))
    shutil.copy(tokenizer_file, run / "tokenizer.json")
    for name in ("config.yaml", "tokenizer.json"):
        shutil.copy(run / name, ckpt / name)
    (ckpt / "scalegpt.json").write_text('{"step": 1}')
    return run


def sample(path: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["sample", str(path), "--device", "cpu", *args])
    out, err = capsys.readouterr()
    return code, out, err


# --- loading ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resolve_each_kind(run_dir: Path, export_dir: Path) -> None:
    ckpt = checkpoint_dir(run_dir, 1)
    for path, kind in ((run_dir, "run"), (checkpoint_root(run_dir), "run"), (ckpt, "checkpoint")):
        r = resolve(path)
        assert (r.kind, r.weights_dir, r.run_dir) == (kind, ckpt, run_dir)
        assert r.config_file.is_file() and r.tokenizer_file is not None
    r = resolve(export_dir)
    assert (r.kind, r.weights_dir, r.config_file) == ("export", export_dir, export_dir / "config.yaml")


@pytest.mark.slow
def test_resolve_errors(tmp_path: Path, run_dir: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        resolve(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        resolve(tmp_path / "file.txt")
    with pytest.raises(UserError, match="not a run, checkpoint or export directory"):
        resolve(tmp_path)
    checkpoint_root(tmp_path / "run").mkdir(parents=True)
    with pytest.raises(UserError, match="has no checkpoint yet"):
        resolve(tmp_path / "run")
    write_latest(tmp_path / "run", 9)
    with pytest.raises(UserError, match=f"names checkpoint '{tag_for(9)}'"):
        resolve(tmp_path / "run")
    lone = tmp_path / "lone"
    shutil.copytree(checkpoint_dir(run_dir, 1), lone)
    (lone / "config.yaml").unlink()
    with pytest.raises(UserError, match="no config.yaml"):
        resolve(lone)


@pytest.mark.slow
def test_consolidated_state_dict_gathers_the_fp32_master_weights(run_dir: Path) -> None:
    expected = torch.load(run_dir / "expected.pt")
    state = consolidated_state_dict(checkpoint_dir(run_dir, 1))
    assert sorted(state) == sorted(expected)
    for name, tensor in expected.items():
        assert state[name].dtype == torch.float32
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)


@pytest.mark.slow
def test_stage_0_checkpoint_is_read_from_its_module_states(run_dir: Path) -> None:
    expected = torch.load(run_dir / "expected.pt")
    ckpt = run_dir / "stage0" / tag_for(1)
    assert not list(ckpt.glob("*optim_states.pt"))
    state = consolidated_state_dict(ckpt)
    assert sorted(state) == sorted(expected) and all(torch.equal(state[k], v) for k, v in expected.items())


@pytest.mark.slow
def test_corrupt_or_missing_checkpoint_files_are_named(tmp_path: Path, run_dir: Path) -> None:
    ckpt = shutil.copytree(checkpoint_dir(run_dir, 1), tmp_path / tag_for(1))
    optim = next(ckpt.glob("*_optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[:1000])
    with pytest.raises(UserError, match=f"{optim.name} is corrupt or truncated"):
        consolidated_state_dict(ckpt)
    (ckpt / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(UserError, match="mp_rank_00_model_states.pt is missing"):
        consolidated_state_dict(ckpt)


def test_load_for_inference_from_export(export_dir: Path) -> None:
    model, tokenizer, cfg = load_for_inference(export_dir, device="cpu")
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert cfg.model == ModelConfig(**MODEL) and tokenizer.token_to_id("<|endoftext|>") == 0
    half = load_for_inference(export_dir, device="cpu", dtype=torch.bfloat16)[0]
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_hf_layout_export_loads_the_same(tmp_path: Path, export_dir: Path, tokenizer_file: Path) -> None:
    ours = load_for_inference(export_dir, device="cpu")[0].state_dict()
    hf_dir = write_export(tmp_path / "hf", to_hf_state_dict(ours), tokenizer_file)
    (hf_dir / "config.json").write_text(json.dumps(hf_config(ModelConfig(**MODEL))))  # as export --format hf writes
    theirs = load_for_inference(hf_dir, device="cpu")[0].state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_wrapper_prefixes_are_stripped(tmp_path: Path, export_dir: Path, tokenizer_file: Path) -> None:
    ours = load_for_inference(export_dir, device="cpu")[0].state_dict()
    wrapped = {f"module._orig_mod.{k}": v for k, v in ours.items()}  # DDP around torch.compile
    theirs = load_for_inference(write_export(tmp_path / "w", wrapped, tokenizer_file), device="cpu")[0]
    assert all(torch.equal(ours[k], v) for k, v in theirs.state_dict().items())


def test_weights_that_do_not_fit_the_config(tmp_path: Path, export_dir: Path, tokenizer_file: Path) -> None:
    state = load_for_inference(export_dir, device="cpu")[0].state_dict()
    del state["transformer.ln_f.weight"]
    with pytest.raises(UserError, match="do not fit"):
        load_for_inference(write_export(tmp_path / "bad", state, tokenizer_file), device="cpu")


# --- the command ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_checkpoint_and_export_sample_the_same_text(
    run_dir: Path, tmp_path: Path, tokenizer_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exported = write_export(tmp_path / "e", consolidated_state_dict(checkpoint_dir(run_dir, 1)), tokenizer_file)
    capsys.readouterr()
    args = ("--prompt", "the quick", "--max-new-tokens", "12", "--seed", "3")
    from_run = sample(run_dir, *args, capsys=capsys)
    assert from_run[0] == 0 and from_run[1].startswith("the quick")
    assert sample(exported, *args, capsys=capsys)[1] == from_run[1]


def test_same_seed_same_text(export_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--prompt", "To be", "--max-new-tokens", "20", "--temperature", "1.0", "--top-p", "0.95")
    first = sample(export_dir, *args, "--seed", "7", capsys=capsys)
    assert first[0] == 0
    assert sample(export_dir, *args, "--seed", "7", capsys=capsys)[1] == first[1]
    assert sample(export_dir, *args, "--seed", "8", capsys=capsys)[1] != first[1]


def test_greedy_output_is_our_generate_decoded(export_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, tokenizer, _ = load_for_inference(export_dir, device="cpu")
    ids = generate(model, [tokenizer.encode("the lazy").ids], max_new_tokens=15, temperature=0, eot_id=0)[0]
    code, out, _ = sample(
        export_dir, "--prompt", "the lazy", "--max-new-tokens", "15", "--temperature", "0", capsys=capsys
    )
    assert (code, out) == (0, "the lazy" + tokenizer.decode(ids) + "\n")
    no_stream = sample(
        export_dir,
        "--prompt",
        "the lazy",
        "--max-new-tokens",
        "15",
        "--temperature",
        "0",
        "--no-stream",
        capsys=capsys,
    )
    assert no_stream[1] == out


def test_streams_token_by_token(export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pieces: list[str] = []
    monkeypatch.setattr("scalegpt.launch.sample._write", pieces.append)
    assert main(["sample", str(export_dir), "--prompt", "the", "--max-new-tokens", "10", "--temperature", "0"]) == 0
    assert len([p for p in pieces if p]) > 3  # the prompt, several pieces, the final newline


def test_empty_prompt_starts_from_end_of_text(export_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, tokenizer, _ = load_for_inference(export_dir, device="cpu")
    ids = generate(model, [[0]], max_new_tokens=10, temperature=0, eot_id=0)[0]
    code, out, _ = sample(export_dir, "--prompt", "", "--max-new-tokens", "10", "--temperature", "0", capsys=capsys)
    assert (code, out) == (0, tokenizer.decode(ids) + "\n")


def test_prompt_from_stdin(
    export_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("the quick\n"))
    piped = sample(export_dir, "--max-new-tokens", "5", "--temperature", "0", capsys=capsys)
    given = sample(export_dir, "--prompt", "the quick", "--max-new-tokens", "5", "--temperature", "0", capsys=capsys)
    assert piped == given and piped[0] == 0


def test_prompt_file_is_a_batch(export_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick\n\nTo be, or\n")
    code, out, _ = sample(
        export_dir,
        "--prompt-file",
        str(prompts),
        "--num-samples",
        "2",
        "--max-new-tokens",
        "6",
        capsys=capsys,
    )
    assert code == 0
    samples = out.split("--- sample ")[1:]
    assert [s.split("\n", 1)[0] for s in samples] == [f"{i} of 4 ---" for i in range(1, 5)]
    assert [s.split("\n", 1)[1][:5] for s in samples] == ["the q", "the q", "To be", "To be"]
    assert samples[0] != samples[1]  # two samples of one prompt draw different tokens
    alone = sample(export_dir, "--prompt", "To be, or", "--max-new-tokens", "6", capsys=capsys)[1]
    assert alone != ""  # and the command still works for one prompt


def test_stop_string_ends_the_sample(export_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--prompt", "the quick", "--max-new-tokens", "30", "--temperature", "0")
    free = sample(export_dir, *args, capsys=capsys)[1].removeprefix("the quick").removesuffix("\n")
    stop = free[8:10]
    code, out, _ = sample(export_dir, *args, "--stop", stop, "--stop", "never-seen", capsys=capsys)
    assert (code, out) == (0, "the quick" + free[: free.index(stop)] + "\n")


def test_long_prompt_is_cropped_with_a_warning_or_refused(export_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    long_prompt = "the quick brown fox jumps over the lazy dog " * 10
    code, out, err = sample(export_dir, "--prompt", long_prompt, "--max-new-tokens", "3", capsys=capsys)
    assert code == 0 and out.startswith(long_prompt)
    assert "warning: the prompt is" in err and "keeping its last 32" in err
    code, out, err = sample(export_dir, "--prompt", long_prompt, "--strict-context", capsys=capsys)
    assert code == 2 and out == "" and err.startswith("scalegpt: error: the prompt is") and err.count("\n") == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-0.5"], "--temperature must be >= 0"),
        (["--temperature", "nan"], "--temperature must be >= 0"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--top-k", "-1"], "--top-k must be >= 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--num-samples", "0"], "--num-samples must be at least 1"),
        (["--prompt", "a", "--prompt-file", "x"], "either --prompt or --prompt-file"),
        (["--prompt-file", "/no/such/file"], "cannot read --prompt-file"),
        (["--prompt", "a", "--device", "cuda:0" if not torch.cuda.is_available() else "tpu"], "device"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    export_dir: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = sample(export_dir, *args, capsys=capsys)
    assert code == 2 and out == ""
    assert err.startswith("scalegpt: error: ") and message in err and err.count("\n") == 1


def test_bad_paths_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for path in (tmp_path / "missing", tmp_path):
        code, out, err = sample(path, "--prompt", "x", capsys=capsys)
        assert code == 2 and err.startswith("scalegpt: error: ") and err.count("\n") == 1


def test_subprocess_exit_code(tmp_path: Path) -> None:
    """The real entry point: exit status 2 and no traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "scalegpt.launch.cli", "sample", str(tmp_path / "x"), "--top-p", "2"],
        capture_output=True,
        text=True,
    )
    assert (
        done.returncode == 2 and done.stderr.startswith("scalegpt: error: --top-p") and "Traceback" not in done.stderr
    )


# --- streaming text -------------------------------------------------------------------------------


def test_text_stream_never_splits_a_character(tokenizer_file: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    text = "naïve café 日本語のテキスト 🙂 déjà vu"
    ids = tokenizer.encode(text).ids
    assert len(ids) < len(text.encode()), "tokenizer should merge some bytes"
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "some token should hold part of a character"
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_text_stream_holds_back_a_possible_stop_string(tokenizer_file: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    stream, shown = TextStream(tokenizer, ["dog."]), ""
    for i in tokenizer.encode("over the lazy dog, then the dog. more").ids:
        shown += stream.push(i)
        assert "over the lazy dog, then the ".startswith(shown)  # nothing shown is taken back later
    assert stream.stopped and stream.text == "over the lazy dog, then the " == shown + stream.finish()
