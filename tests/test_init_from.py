"""model.init_from end to end: start a run from a Hugging Face GPT-2 folder or from another scalegpt run,
and read Hugging Face folders in sample, eval and export. The sources are written here, as a user's would be:
a random GPT2LMHeadModel in the hub's own layout (unprefixed keys, one file, vocab.json + merges.txt) and a
GPTNeoForCausalLM saved with save_pretrained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from scalegpt.launch.cli import main
from scalegpt.model import ModelConfig, build_model
from scalegpt.train.config.schema import read_config_file
from scalegpt.train.data.tokenizer import PACKAGED_TOKENIZERS, load_tokenizer, tokenizer_hash
from scalegpt.train.weights import load_for_inference, model_from_state

from e2e import SMALL_DATA, SMOKE, metrics, scalegpt
from helpers import one_error_line

transformers = pytest.importorskip("transformers")

GPT2_SHAPE = dict(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=50257)


def _hub_gpt2(folder: Path, **changes: object) -> Path:
    """A random GPT-2 laid out as the hub's `gpt2` repository is: config.json, model.safetensors with keys
    lacking the `transformer.` prefix (and the old causal-mask buffers), vocab.json and merges.txt."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(**GPT2_SHAPE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    folder.mkdir(parents=True)
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()}
    state.pop("lm_head.weight", None)  # tied to wte: the hub's file does not store it
    n = config.n_positions
    for i in range(config.n_layer):  # written by old transformers versions, and still in the hub's file
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n).to(torch.float32)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf = config.to_dict()
    hf.update(changes)
    (folder / "config.json").write_text(json.dumps(hf))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(PACKAGED_TOKENIZERS["gpt2"] / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _hub_gpt2(tmp_path_factory.mktemp("hub") / "gpt2")


@pytest.fixture(scope="module")
def gpt2_data(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke corpus, tokenized with the source's own tokenizer (data.tokenizer: its folder)."""
    data = tmp_path_factory.mktemp("gpt2-data") / "data"
    scalegpt(
        "prepare", SMOKE, f"data.dir={data}", f"model.init_from={gpt2_dir}", f"data.tokenizer={gpt2_dir}", *SMALL_DATA
    )
    return data


def _hf_losses(model: torch.nn.Module, run: Path) -> dict[str, float]:
    """transformers' mean cross-entropy per source over the run's own validation batches."""
    from scalegpt.train.data.mixture import Mixture

    cfg = read_config_file(run / "config.yaml")
    mixture = Mixture.for_config(cfg)
    out = {}
    for name in mixture.names:
        total = count = 0.0
        for batch in mixture.val_batches(name, cfg.train.micro_batch, cfg.eval.batches):
            with torch.no_grad():  # the (B, n_ctx + 1) window: inputs are its first n_ctx, targets its last
                logits = model(batch[:, :-1]).logits
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), batch[:, 1:].flatten())
            n = batch[:, 1:].numel()
            total, count = total + loss.item() * n, count + n
        out[name] = total / count
    return out


def test_save_pretrained_and_the_hubs_layout_read_the_same(gpt2_dir: Path, tmp_path: Path) -> None:
    """What save_pretrained writes (prefixed keys, no mask buffers) and the hub's own layout, of the same
    model: both load to the same weights, whose logits are transformers'."""
    torch.manual_seed(0)  # _hub_gpt2's draw
    config = transformers.GPT2Config(**GPT2_SHAPE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    theirs = transformers.GPT2LMHeadModel(config).eval()
    theirs.save_pretrained(str(tmp_path / "saved"))
    theirs.save_pretrained(str(tmp_path / "sharded"), max_shard_size="1MB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    (tmp_path / "bin").mkdir()  # the hub's older pickle layout, keys unprefixed as in its gpt2 repository
    shutil.copy(gpt2_dir / "config.json", tmp_path / "bin" / "config.json")
    unprefixed = {k.removeprefix("transformer."): v for k, v in theirs.state_dict().items() if k != "lm_head.weight"}
    torch.save(unprefixed, tmp_path / "bin" / "pytorch_model.bin")
    hub = load_for_inference(gpt2_dir, device="cpu")[0].state_dict()
    for folder in ("saved", "sharded", "bin"):
        load_tokenizer("gpt2").save(str(tmp_path / folder / "tokenizer.json"))
        saved = load_for_inference(tmp_path / folder, device="cpu")[0]
        assert all(torch.equal(v, hub[k]) for k, v in saved.state_dict().items()), folder
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(saved(idx)[0], theirs(idx).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_step0_validation_loss_equals_transformers_loss(gpt2_dir: Path, gpt2_data: Path, tmp_path: Path) -> None:
    run, source = tmp_path / "run", tmp_path / "gpt2"
    shutil.copytree(gpt2_dir, source)  # a copy, moved away below

    def train(steps: int) -> str:
        return scalegpt(
            "train", SMOKE, f"run.dir={run}", f"data.dir={gpt2_data}", *SMALL_DATA,
            f"model.init_from={source}", f"data.tokenizer={source}",
            f"train.max_steps={steps}", "eval.batches=2", "checkpoint.every=0", "model.dropout=0.1",
        ).stdout  # fmt: skip

    assert f"starting from the weights of {source}" in train(2)
    cfg = read_config_file(run / "config.yaml")
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_ctx, cfg.model.vocab_size) == (2, 32, 64, 50257)
    assert cfg.model.dropout == 0.1  # dropout is the run's to choose
    step0 = next(m for m in metrics(run) if m["step"] == 0)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(source), local_files_only=True).eval()
    expected = _hf_losses(theirs, run)
    assert expected  # every source has validation batches
    for name, loss in expected.items():
        assert abs(step0[f"val_loss/{name}"] - loss) < 1e-5, (name, step0[f"val_loss/{name}"], loss)
    assert [m["step"] for m in metrics(run) if m["loss"] is not None] == [1, 2]  # a fresh step count
    source.rename(tmp_path / "moved")  # a run with a checkpoint of its own needs its source no more
    assert "resumed from" in train(3)
    assert [m["step"] for m in metrics(run) if m["loss"] is not None] == [1, 2, 3]


@pytest.mark.slow
def test_eval_reads_a_hugging_face_folder(gpt2_dir: Path, gpt2_data: Path, tmp_path: Path) -> None:
    report = tmp_path / "eval.json"
    scalegpt(
        "eval", str(gpt2_dir), "--tasks", "2D+", "--shots", "0", "--num-examples", "4",
        "--val-batches", "2", "--data-dir", str(gpt2_data), "--json", str(report),
    )  # fmt: skip
    result = json.loads(report.read_text())
    assert result["n_ctx"] == 64 and result["fewshot"] and result["validation"]["metrics"]


@pytest.mark.slow
def test_a_run_starts_from_another_runs_weights_on_new_data(reference_runs, tmp_path: Path) -> None:  # noqa: ANN001
    """A new run.dir from a finished run, on data of another mix: the weights carry over (the shared source's
    validation loss at step 0 is the source's last one), and the step, schedule and optimizer start afresh."""
    source = reference_runs(2)
    data = tmp_path / "data"
    other_mix = ["data.sources.0.builtin_mb=0.4", "data.sources.1.builtin_mb=0.6", "data.sources.2.builtin_mb=0.2"]
    scalegpt("prepare", SMOKE, f"data.dir={data}", f"model.init_from={source}", f"data.tokenizer={source}", *other_mix)
    run = tmp_path / "run"
    proc = scalegpt(
        "train", SMOKE, f"run.dir={run}", f"data.dir={data}", *other_mix,
        f"model.init_from={source}", f"data.tokenizer={source}",
        "train.max_steps=3", "eval.every=5", "log.every=1", "checkpoint.every=0",
    )  # fmt: skip
    assert "resumed" not in proc.stdout
    ours, theirs = metrics(run), metrics(source)
    last = max((m for m in theirs if "val_loss/arithmetic" in m), key=lambda m: m["step"])
    assert last["step"] == 10
    # arithmetic's 0.4 MB is generated alike in both: the same validation windows, the same weights
    assert abs(ours[0]["val_loss/arithmetic"] - last["val_loss/arithmetic"]) < 1e-5
    assert ours[0]["val_loss/scramble"] != pytest.approx(last["val_loss/scramble"], abs=1e-4)  # other data
    resumed = scalegpt(
        "train", SMOKE, f"run.dir={run}", f"data.dir={data}", *other_mix,
        f"model.init_from={source}", f"data.tokenizer={source}",
        "train.max_steps=4", "eval.every=5", "log.every=1", "checkpoint.every=0",
    )  # fmt: skip
    assert "resumed from" in resumed.stdout and "starting from the weights" not in resumed.stdout  # its own
    assert [m["step"] for m in metrics(run) if m["loss"] is not None] == [1, 2, 3, 4]
    first = next(m for m in ours if m["step"] == 1)
    assert first["lr"] == next(m for m in theirs if m["step"] == 1)["lr"]  # the schedule starts again
    random_start = next(m for m in theirs if m["step"] == 0)["val_loss/arithmetic"]
    assert ours[0]["val_loss/arithmetic"] < random_start - 0.5  # trained weights, not a fresh draw


def _error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """The one error line of the real entry point, run in this process: these refusals come from loading."""
    code = main(list(args))
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    return one_error_line(err)


def _out(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    return out


def _dry_run(capsys: pytest.CaptureFixture[str], *overrides: str) -> str:
    return _out(capsys, "train", SMOKE, "--dry-run", *overrides)


def _process_error(*args: str) -> str:
    proc = scalegpt(*args, check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    return one_error_line(proc.stderr)


def test_the_shape_comes_from_the_source_and_conflicts_are_named(
    gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = [f"model.init_from={gpt2_dir}", f"data.tokenizer={gpt2_dir}"]
    shown = _dry_run(capsys, *src, "model.n_ctx=32", "model.dropout=0.2")  # tiny.yaml's shape yields to the source
    for line in ("n_layer: 2", "n_head: 2", "d_model: 32", "n_ctx: 32", "vocab_size: 50257", "dropout: 0.2"):
        assert f"  {line}\n" in shown
    line = _error(capsys, "train", SMOKE, "--dry-run", *src, "model.n_layer=3")
    assert "model.n_layer=3 in the command line conflicts with model.init_from" in line and "n_layer=2" in line
    line = _error(capsys, "train", SMOKE, "--dry-run", *src, "model.n_ctx=128")
    assert "n_ctx=128" in line and "n_ctx=64" in line and "at most" in line
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(f"defaults:\n  data: builtin\nmodel:\n  init_from: {gpt2_dir}\n  d_model: 64\n")
    line = _error(capsys, "train", str(run_yaml), "--dry-run", f"data.tokenizer={gpt2_dir}")
    assert f"model.d_model=64 in {run_yaml} conflicts" in line and "d_model=32" in line
    neo = _neo_dir(tmp_path / "neo")  # GPT-Neo: alternating layers, no q/k/v biases, its window
    shown = _dry_run(capsys, f"model.init_from={neo}", f"data.tokenizer={neo}")
    for line in ("attention: alternating", "local_window: 8", "qkv_bias: false", "n_ctx: 48"):
        assert f"  {line}\n" in shown
    # the tokenizer comes with the weights: interpolating init_from is the YAML way to say so
    run_yaml.write_text(
        f"defaults:\n  data: builtin\nmodel:\n  init_from: {gpt2_dir}\ndata:\n  tokenizer: ${{model.init_from}}\n"
    )
    assert f"tokenizer: {gpt2_dir}\n" in _out(capsys, "train", str(run_yaml), "--dry-run")
    # the same, as an override
    shown = _dry_run(capsys, f"model.init_from={gpt2_dir}", "data.tokenizer=${model.init_from}")
    assert f"  tokenizer: {gpt2_dir}\n" in shown


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"activation_function": "relu"}, "activation_function"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
    ],
)
def test_unrepresentable_gpt2_configs_are_refused(
    changes: dict, named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**transformers.GPT2Config(**GPT2_SHAPE).to_dict(), **changes}))
    line = _error(capsys, "train", SMOKE, "--dry-run", f"model.init_from={folder}", f"data.tokenizer={folder}")
    assert "model.init_from" in line and named in line
    assert named in _error(capsys, "sample", str(folder), "--prompt", "x")


def test_a_gpt_neo_layer_pattern_other_than_ours_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _neo_dir(tmp_path / "neo")
    hf = json.loads((folder / "config.json").read_text())
    hf["attention_types"] = [[["local", "global"], 1]]  # layer 0 local: not GPT-3's alternation
    (folder / "config.json").write_text(json.dumps(hf))
    line = _error(capsys, "train", SMOKE, "--dry-run", f"model.init_from={folder}", f"data.tokenizer={folder}")
    assert "attention_types" in line
    assert "attention_types" in _error(capsys, "sample", str(folder), "--prompt", "x")


def test_bad_sources_are_refused(gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _error(capsys, "train", SMOKE, "--dry-run", f"model.init_from={tmp_path / 'nope'}", "data.tokenizer=gpt2")
    assert "model.init_from" in line and "does not exist" in line
    line = _error(capsys, "train", SMOKE, "--dry-run", "model.init_from=openai-community/gpt2", "data.tokenizer=gpt2")
    assert "read offline" in line and "hf download openai-community/gpt2 --local-dir" in line  # a hub name
    line = _error(capsys, "train", SMOKE, "--dry-run", f"model.init_from={gpt2_dir}")  # data.tokenizer left at bpe
    assert "data.tokenizer" in line and "model.init_from" in line
    empty = tmp_path / "empty"  # config.json and a weights file that holds none of the model's tensors
    empty.mkdir()
    shutil.copy(gpt2_dir / "config.json", empty / "config.json")
    save_file({"unrelated": torch.zeros(1)}, str(empty / "model.safetensors"), metadata={"format": "pt"})
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_dir / name, empty / name)
    assert "lack" in _error(capsys, "sample", str(empty), "--prompt", "x")


@pytest.mark.slow
def test_data_prepared_with_another_tokenizer_is_refused(reference_runs, smoke_data: Path, tmp_path: Path) -> None:  # noqa: ANN001
    source = reference_runs(2)  # its BPE was trained on the smaller corpus; smoke_data's on the full one
    theirs = load_tokenizer(source / "tokenizer.json")
    assert tokenizer_hash(theirs) != tokenizer_hash(load_tokenizer(smoke_data / "tokenizer.json"))
    run = tmp_path / "run"
    line = _process_error(
        "train", SMOKE, f"run.dir={run}", f"data.dir={smoke_data}", f"model.init_from={source}",
        f"data.tokenizer={source}", "train.max_steps=1",
    )  # fmt: skip
    assert f"{smoke_data} was prepared with a different tokenizer" in line
    assert not run.exists()  # a refused start writes nothing


def test_a_shorter_context_keeps_the_first_positions() -> None:
    long = build_model(ModelConfig(n_layer=2, n_head=2, d_model=32, n_ctx=64, vocab_size=97), seed=3).eval()
    short = model_from_state(
        ModelConfig(n_layer=2, n_head=2, d_model=32, n_ctx=16, vocab_size=97), long.state_dict(), "x"
    )
    assert short.transformer.wpe.weight.shape == (16, 32)
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(short.eval()(idx)[0], long(idx)[0], rtol=0, atol=0)


def _neo_dir(folder: Path) -> Path:
    torch.manual_seed(1)
    config = transformers.GPTNeoConfig(
        vocab_size=50257, max_position_embeddings=48, hidden_size=32, num_layers=2, num_heads=2,
        attention_types=[[["global", "local"], 1]], window_size=8,
        resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    transformers.GPTNeoForCausalLM(config).eval().save_pretrained(str(folder))
    load_tokenizer("gpt2").save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neo"])
def test_sample_reads_hugging_face_folders_and_decodes_as_transformers_does(
    kind: str, gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = gpt2_dir if kind == "gpt2" else _neo_dir(tmp_path / "neo")
    prompt = "The quick brown fox"
    out = _out(capsys, "sample", str(folder), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "30")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    tok = load_tokenizer(folder)
    ids = torch.tensor([tok.encode(prompt).ids])
    greedy = theirs.generate(ids, do_sample=False, max_new_tokens=30, min_new_tokens=30, pad_token_id=50256)
    assert tok.decode(greedy[0].tolist()) in out
    model, _, cfg = load_for_inference(folder, device="cpu")
    assert cfg.model.attention == ("dense" if kind == "gpt2" else "alternating")
    exported = tmp_path / "st"
    _out(capsys, "export", str(folder), "--format", "safetensors", str(exported))
    again, _, _ = load_for_inference(exported, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
