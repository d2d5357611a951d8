"""Every YAML loads and validates; each kind of bad config gives one clear line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from scalegpt.launch.cli import main
from scalegpt.train.config.loading import load_config
from scalegpt.train.config.schema import Config, from_yaml_text, to_yaml
from scalegpt.train.errors import UserError

from conftest import CONFIGS

RUN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_run_config_loads(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    # continue-gpt2 starts from models/gpt2, which a user downloads: its config.json is all loading reads
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "gpt2").mkdir(parents=True)
    transformers.GPT2Config().to_json_file(str(tmp_path / "models" / "gpt2" / "config.json"))
    cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.data.sources
    assert from_yaml_text(to_yaml(cfg)) == cfg  # the resolved YAML written to run dirs reads back
    if cfg.model.init_from:  # GPT-2 small's shape, from its config.json (transformers' defaults)
        assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_ctx, cfg.model.vocab_size) == (12, 768, 1024, 50257)
        assert cfg.data.tokenizer == cfg.model.init_from == "models/gpt2"


def _compose(tmp_path: Path, model: str, data: str) -> Config:
    """A run file in tmp_path naming two presets, found through symlinks to configs/model and data."""
    (tmp_path / "model").symlink_to(CONFIGS / "model")
    (tmp_path / "data").symlink_to(CONFIGS / "data")
    run = tmp_path / "run.yaml"
    run.write_text(f"defaults:\n  model: {model}\n  data: {data}\n")
    return load_config(run)


@pytest.mark.parametrize("preset", sorted((CONFIGS / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_model_preset_composes(preset: Path, tmp_path: Path) -> None:
    cfg = _compose(tmp_path, preset.stem, "builtin")
    assert cfg.model.n_layer > 0 and cfg.data.sources[0].builtin == "arithmetic"


@pytest.mark.parametrize("preset", sorted((CONFIGS / "data").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_data_preset_composes(preset: Path, tmp_path: Path) -> None:
    cfg = _compose(tmp_path, "tiny", preset.stem)
    assert cfg.data.sources and all(s.weight > 0 for s in cfg.data.sources)


def test_gpt3_presets_carry_table_values() -> None:
    small = load_config(CONFIGS / "gpt3-small.yaml")
    assert (small.model.n_layer, small.model.d_model, small.model.n_head) == (12, 768, 12)
    assert small.train.global_batch * small.model.n_ctx == 524_288 and small.optim.lr == 6e-4
    xl = load_config(CONFIGS / "gpt3-xl.yaml")
    assert xl.model.d_model == 2048 and xl.model.d_model % xl.model.n_head == 0
    assert load_config(CONFIGS / "gpt3-13b.yaml").model.d_model == 5120
    assert load_config(CONFIGS / "gpt3-175b.yaml").optim.lr == 0.6e-4


def test_overrides_apply_last() -> None:
    cfg = load_config(CONFIGS / "smoke.yaml", ["model.n_layer=3", "optim.lr=1e-3", "run.dir=/tmp/x"])
    assert (cfg.model.n_layer, cfg.optim.lr, cfg.run.dir) == (3, 1e-3, "/tmp/x")


BAD = [
    (["model.n_layr=3"], "model.n_layr in the command line"),
    (["model.n_layer=two"], "model.n_layer in the command line"),
    (["model.d_model=130"], "model.d_model in the command line: 130 is not divisible by n_head=4"),
    (
        ["train.global_batch=12"],
        "train.global_batch in the command line: 12 is not divisible by train.micro_batch=8",
    ),
    (["optim.lr=-1"], "optim.lr in the command line: must be positive"),
    (["train.precision=fp8"], "train.precision"),
    (["data.sources.0.weight=0"], "data.sources.0.weight"),
    (["data.sources.1.name=arithmetic"], "duplicate source name"),
    (["model.n_layer"], "not key=value"),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD, ids=[b[1][:30] for b in BAD])
def test_bad_config_is_one_line_and_exit_2(overrides: list[str], expected: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", str(CONFIGS / "smoke.yaml"), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scalegpt: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert expected in err


def test_bad_value_in_a_file_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "bad.yaml"
    run.write_text("model:\n  n_head: 3\n  d_model: 64\ntrain:\n  micro_batch: 2\n")
    assert main(["train", str(run)]) == 2
    assert f"model.d_model in {run}: 64 is not divisible by n_head=3" in capsys.readouterr().err
    run.write_text("optim:\n  learning_rate: 1.0\n")
    assert main(["train", str(run)]) == 2
    assert f"optim.learning_rate in {run}" in capsys.readouterr().err


def test_missing_and_malformed_files() -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_config("nope.yaml")
    with pytest.raises(UserError, match="no preset"):
        load_config(_write("defaults:\n  model: gpt5\n"))
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(_write("model: [\n"))


def _write(text: str) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "c.yaml"
    path.write_text(text)
    return path
