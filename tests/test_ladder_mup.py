"""`scalegpt ladder --coord-check`: the μP coordinate check through the real command. Its JSON holds one
record per width, parametrization and layer; a recorded size equals one computed here from the model's
parameters, after an optimizer step whose μP groups are built here by hand; under μP the logits and the
blocks drift less with width than under the standard parametrization. `--lr-sweep`: every width at every
learning rate, as ordinary rungs, and the best per width is the argmin of their final losses. Bad widths
and sweep values are one-line errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from scalegpt.launch.cli import main
from scalegpt.model.config import ModelConfig
from scalegpt.model.gpt import build_model
from scalegpt.train.config.loading import load_config
from scalegpt.train.data.mixture import Mixture

from e2e import SMALL_DATA, SMOKE, scalegpt
from helpers import one_error_line

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WIDTHS = [32, 64, 128]
LAYERS = ["embedding", "block0.attn", "block0.mlp", "block1.attn", "block1.mlp", "ln_f", "logits"]


@pytest.fixture(scope="module")
def coord(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], dict]:
    """One coordinate check of the smoke model at three tiny widths, two steps each."""
    out = tmp_path_factory.mktemp("coord")
    overrides = [f"run.dir={out}", f"data.dir={prepared}", *SMALL_DATA]
    proc = scalegpt("ladder", SMOKE, *overrides, "--coord-check", "--widths", "128,32,64", "--coord-steps", "2")
    assert "under mup the largest drift of any layer is" in proc.stdout
    return out, overrides, json.loads((out / "coord.json").read_text())


@pytest.mark.slow  # it trains three widths in-process
def test_coord_check_writes_one_record_per_width_parametrization_and_layer(coord: tuple[Path, list[str], dict]) -> None:
    out, _, data = coord
    assert data["widths"] == WIDTHS and data["mup_base_d_model"] == 32 and data["layers"] == LAYERS
    keys = sorted((r["parametrization"], r["width"], r["layer"]) for r in data["records"])
    assert keys == sorted((p, w, layer) for p in ("standard", "mup") for w in WIDTHS for layer in LAYERS)
    assert all(len(r["sizes"]) == 2 and all(s > 0 for s in r["sizes"]) for r in data["records"])
    assert (out / "coord.png").read_bytes().startswith(PNG_MAGIC)
    size = {(r["parametrization"], r["width"], r["layer"]): r["sizes"] for r in data["records"]}
    for p in ("standard", "mup"):  # the growth table is the last step's sizes at the widest over the narrowest
        for layer in LAYERS:
            assert data["growth"][p][layer] == pytest.approx(size[p, 128, layer][-1] / size[p, 32, layer][-1])
    # At the base width μP is the standard model: the same sizes at every step, bit for bit.
    assert all(size["mup", 32, layer] == size["standard", 32, layer] for layer in LAYERS)


def _forward_sizes(model: torch.nn.Module, cfg: ModelConfig, idx: torch.Tensor) -> dict[str, float]:
    """The recorded statistics, computed from the model's parameters by hand."""
    t = model.transformer
    x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1]))
    out = {"embedding": x.abs().mean().item()}
    for i, block in enumerate(t.h):
        a = block.attn(block.ln_1(x))
        x = x + a
        m = block.mlp(block.ln_2(x))
        x = x + m
        out[f"block{i}.attn"], out[f"block{i}.mlp"] = a.abs().mean().item(), m.abs().mean().item()
    h = t.ln_f(x)
    out["ln_f"] = h.abs().mean().item()
    out["logits"] = (h * (cfg.mup_base_d_model or cfg.d_model) / cfg.d_model @ t.wte.weight.T).abs().mean().item()
    return out


@torch.no_grad()
def _adamw_step(model: torch.nn.Module, cfg: ModelConfig, idx: torch.Tensor, targets: torch.Tensor) -> None:
    """One AdamW step with μP's groups written from docs/mup.md's table: hidden matrices at lr / m with
    weight decay x m, embeddings at lr, 1-D parameters undecayed."""
    m = cfg.d_model / cfg.mup_base_d_model if cfg.mup_base_d_model else 1.0
    hidden = [p for n, p in model.named_parameters() if n.endswith("weight") and ("attn.c_" in n or "mlp.c_" in n)]
    embed = [model.transformer.wte.weight, model.transformer.wpe.weight]
    flat = [p for p in model.parameters() if p.dim() == 1]
    lr, wd = 3e-3, 0.1  # smoke.yaml's optim
    opt = torch.optim.AdamW(
        [
            {"params": hidden, "lr": lr / m, "weight_decay": wd * m},
            {"params": embed, "lr": lr, "weight_decay": wd},
            {"params": flat, "lr": lr, "weight_decay": 0.0},
        ],
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    with torch.enable_grad():
        logits, _ = model(idx)
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    opt.step()


@pytest.mark.parametrize("parametrization", ["mup", "standard"])
def test_a_recorded_size_equals_one_computed_from_the_weights(
    coord: tuple[Path, list[str], dict], parametrization: str
) -> None:
    _, overrides, data = coord
    cfg = load_config(SMOKE, overrides)
    assert data["batch"] == cfg.train.micro_batch and data["seed"] == cfg.run.seed
    mup = parametrization == "mup"
    mcfg = ModelConfig(
        n_layer=2,
        n_head=4,
        d_model=128,
        n_ctx=128,
        vocab_size=512,
        parametrization=parametrization,
        mup_base_d_model=32 if mup else None,
    )
    model = build_model(mcfg, seed=cfg.run.seed)
    b = cfg.train.micro_batch
    batches = Mixture.for_config(cfg).batch(range(2 * b))  # the check's first two steps' batches
    first, second = batches[:b], batches[b:]
    recorded = {
        r["layer"]: r["sizes"] for r in data["records"] if (r["parametrization"], r["width"]) == (parametrization, 128)
    }
    with torch.no_grad():
        at_init = _forward_sizes(model, mcfg, first[:, :-1])
    _adamw_step(model, mcfg, first[:, :-1], first[:, 1:])
    with torch.no_grad():
        after = _forward_sizes(model, mcfg, second[:, :-1])
    for layer in LAYERS:
        assert recorded[layer][0] == pytest.approx(at_init[layer], rel=1e-5), layer
        assert recorded[layer][1] == pytest.approx(after[layer], rel=1e-4), layer


def test_under_mup_activations_drift_less_with_width(coord: tuple[Path, list[str], dict]) -> None:
    """Four times the width: under standard the blocks' outputs grow several-fold after a step, since
    Adam moves every weight by about lr whatever its fan-in; μP's lr / m keeps them within 1.5x."""
    growth = coord[2]["growth"]
    drift = {p: {k: abs(math.log(v)) for k, v in growth[p].items()} for p in growth}
    assert drift["mup"]["logits"] < drift["standard"]["logits"]
    blocks = [k for k in LAYERS if k.startswith("block")]
    assert all(growth["standard"][k] > 2.0 for k in blocks), growth["standard"]
    assert all(drift["mup"][k] < math.log(1.5) for k in blocks), growth["mup"]


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--coord-check", "--widths", "64,abc"], "'abc' is not a whole number"),
        (["--coord-check", "--widths", "64,-32"], "every width must be positive, got -32"),
        (["--coord-check", "--widths", "64,0"], "every width must be positive, got 0"),
        (["--coord-check", "--widths", "64"], "give at least two different widths"),
        (["--coord-check", "--widths", "30,64"], "30 not divisible by model.n_head=4"),
        (["--coord-check", "--coord-steps", "0"], "--coord-steps must be at least 1, got 0"),
        (["--coord-check", "--lr-sweep", "1e-3"], "--coord-check trains no rungs, so it takes no --lr-sweep"),
        (["--lr-sweep", "1e-3,abc"], "'abc' is not a number"),
        (["--lr-sweep", "1e-3,0"], "every learning rate must be a positive number, got 0"),
        (["--lr-sweep", "1e-3,nan"], "every learning rate must be a positive number, got nan"),
        (["--lr-sweep", "1e-3,0.001"], "a learning rate is listed twice"),
        (["--lr-sweep", "1e-3", "--axis", "model.n_ctx=64,128"], "give it or --axis, not both"),
    ],
)
def test_bad_widths_and_sweeps_are_one_error_line(
    tmp_path: Path, args: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["ladder", SMOKE, f"run.dir={tmp_path / 'c'}", *args])
    assert code == 2
    assert complaint in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "c").exists()


# -- the learning-rate sweep --------------------------------------------------------------------------------
def test_a_sweep_trains_every_width_at_every_learning_rate_unscaled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The plan: one rung per (learning rate, width), each at the swept value whatever its width, where a
    plain ladder scales optim.lr by the width (--lr-exponent)."""
    args = ["--sizes", "32", "64", "--lr-sweep", "3e-3,0.001", "--launch", "--procs", "1", "--dry-run"]
    assert main(["ladder", SMOKE, f"run.dir={tmp_path / 's'}", *args]) == 0
    out = capsys.readouterr().out
    assert "lr swept over 0.001, 0.003 at every width" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("optim.lr=")]
    assert [(r[0], r[1], float(r[-1])) for r in rows] == [
        ("optim.lr=0.001", "L1-d32", 0.001),
        ("optim.lr=0.001", "L1-d64", 0.001),
        ("optim.lr=0.003", "L1-d32", 0.003),
        ("optim.lr=0.003", "L1-d64", 0.003),
    ]


@pytest.mark.slow
def test_a_sweep_reports_the_argmin_of_each_widths_final_loss(prepared: Path, tmp_path: Path) -> None:
    """Two widths at two learning rates under μP, through the real command: each rung is an ordinary run at
    its learning rate; the best per width is the argmin of the rungs' final validation losses read here
    from their metrics.jsonl; a second run trains nothing."""
    ladder = tmp_path / "sweep"
    args = [
        "ladder",
        SMOKE,
        f"run.dir={ladder}",
        f"data.dir={prepared}",
        *SMALL_DATA,
        "model.parametrization=mup",
        "model.mup_base_d_model=32",
        "model.mup_base_d_head=32",
        *["--sizes", "32", "64", "--tokens", "8192", "--evals", "1", "--checkpoints", "1"],
        *["--lr-sweep", "1e-2,0.001"],
    ]
    out = scalegpt(*args, timeout=600).stdout
    summary = json.loads((ladder / "ladder.json").read_text())
    assert summary["lr_sweep"] == ["0.001", "0.01"]
    final: dict[int, dict[float, float]] = {}
    for lr in ("0.001", "0.01"):
        for rung in ("L1-d32", "L1-d64"):
            run = ladder / f"optim.lr={lr}" / rung
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            assert cfg["optim"]["lr"] == float(lr) and cfg["model"]["parametrization"] == "mup"
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            last = [r for r in rows if r.get("step") == 4 and "val_loss" in r]
            final.setdefault(cfg["model"]["d_model"], {})[float(lr)] = last[-1]["val_loss"]
    expect = [(d, min(losses, key=losses.__getitem__)) for d, losses in sorted(final.items())]
    best = summary["lr_sweep_best"]
    assert [(b["d_model"], b["lr"]) for b in best] == expect
    assert [b["val_loss"] for b in best] == [final[d][lr] for d, lr in expect]
    for (d, lr), b in zip(expect, best, strict=True):
        assert re.search(rf"{b['name']} .*{final[d][lr]:.4f}\*\s+{lr:g} \(2 of 2 done\)", out), out[-2000:]
    assert (ladder / "lr_sweep.png").read_bytes().startswith(PNG_MAGIC)

    again = scalegpt(*args, timeout=600).stdout
    assert again.count("finished earlier, not trained again") == 4
    assert json.loads((ladder / "ladder.json").read_text())["lr_sweep_best"] == best
