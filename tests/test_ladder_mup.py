"""`scalegpt ladder --coord-check`: the μP coordinate check through the real command. Its JSON holds one
record per width, parametrization and layer; a recorded size equals one computed here from the model's
parameters, after an optimizer step whose μP groups are built here by hand; under μP the logits and the
blocks drift less with width than under the standard parametrization. `--lr-sweep`: every width at every
learning rate, as ordinary rungs, and the best per width is the argmin of their final losses; the transfer
criterion and the predictive check are checked on made-up losses worked out by hand, and end to end against
the rungs' own metrics. Bad widths and sweep values are one-line errors."""

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
from scalegpt.launch.ladder.plan import RungInfo
from scalegpt.launch.ladder.results import Outcome
from scalegpt.launch.ladder.sweep import report_lines, sweep_report
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


def MUP_AT(base: int) -> list[str]:  # noqa: N802 (reads as the overrides it stands for)
    return ["model.parametrization=mup", f"model.mup_base_d_model={base}"]


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
        (["--lr-sweep", "1e-3,1e-2", *MUP_AT(0)], "mup_base_d_model in the command line: must be a positive width"),
        (["--lr-sweep", "1e-3,1e-2", *MUP_AT(-32)], "of a sweep), got -32"),
        (["--lr-sweep", "1e-3", *MUP_AT(32), "model.mup_base_d_head=-8"], "head width, got -8"),
    ],
)
def test_bad_widths_and_sweeps_are_one_error_line(
    tmp_path: Path, args: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["ladder", SMOKE, f"run.dir={tmp_path / 'c'}", *args])
    assert code == 2
    assert complaint in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "c").exists()


def test_a_base_width_set_in_yaml_that_is_not_positive_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "mup.yaml"
    config.write_text(Path(SMOKE).read_text() + "model:\n  parametrization: mup\n  mup_base_d_model: 0\n")
    code = main(["ladder", str(config), f"run.dir={tmp_path / 'c'}", "--lr-sweep", "1e-3,1e-2", "--sizes", "32", "64"])
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"model.mup_base_d_model in {config}: must be a positive width" in line and "got 0" in line, line
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
def test_a_sweep_reports_the_argmin_of_each_widths_final_loss_and_the_predictive_check(
    prepared: Path, tmp_path: Path
) -> None:
    """Three widths at two learning rates under μP, through the real command: each rung is an ordinary run at
    its learning rate; the best per width is the argmin of the rungs' final validation losses read here
    from their metrics.jsonl, and the predictive check's pick, loss and gap printed and in ladder.json are
    the ones computed here from the same losses; a second run trains nothing."""
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
        *["--sizes", "1x32", "1x64", "1x128", "--tokens", "8192", "--evals", "1", "--checkpoints", "1"],
        *["--lr-sweep", "1e-2,0.001"],
    ]
    out = scalegpt(*args, timeout=900).stdout
    summary = json.loads((ladder / "ladder.json").read_text())
    assert summary["lr_sweep"] == ["0.001", "0.01"]
    final: dict[int, dict[float, float]] = {}
    for lr in ("0.001", "0.01"):
        for rung in ("L1-d32", "L1-d64", "L1-d128"):
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

    # The predictive check: the grid point with the lowest mean over d32 and d64, and d128's loss at it.
    pick = min((0.001, 0.01), key=lambda lr: final[32][lr] + final[64][lr])
    loss, best_lr = final[128][pick], expect[-1][1]
    gap = loss / final[128][best_lr] - 1
    p = summary["lr_prediction"]
    assert (p["picked_at"], p["lr"], p["widest"], p["loss"]) == (["L1-d32", "L1-d64"], pick, "L1-d128", loss)
    assert (p["best_lr"], p["best_loss"], p["settled"]) == (best_lr, final[128][best_lr], True)
    assert p["gap"] == pytest.approx(gap) and p["passed"] is (gap <= 0.01)
    assert (
        f"predictive check: lr {pick:g} picked at L1-d32 and L1-d64 (their lowest mean final loss, "
        f"{(final[32][pick] + final[64][pick]) / 2:.4f}); L1-d128 at it {loss:.4f}, its best "
        f"{final[128][best_lr]:.4f} (lr {best_lr:g}): {100 * gap:+.2f}%, within 1%: {'PASS' if gap <= 0.01 else 'FAIL'}"
    ) in out
    spread = len({lr for _, lr in expect}) - 1  # two grid points: 0 or 1 step apart
    assert summary["lr_transfer"] == {
        "grid": [0.001, 0.01],
        "best": {f"L1-d{d}": lr for d, lr in expect},
        "spread": spread,
        "holds": True,
    }
    assert f"at every width): yes, {spread} grid step(s) apart" in out

    again = scalegpt(*args, timeout=900).stdout
    assert again.count("finished earlier, not trained again") == 6
    assert json.loads((ladder / "ladder.json").read_text())["lr_sweep_best"] == best


# -- the sweep's verdicts, on losses worked out by hand -----------------------------------------------------
GRID = [1e-3, 3e-3, 1e-2]


def _outcomes(losses: dict[int, list[float | None]]) -> list[Outcome]:
    """Finished rungs of depth 2 with these final losses, one list per width over GRID (None: not finished)."""
    out = []
    for d, row in losses.items():
        for lr, loss in zip(GRID, row, strict=True):
            info = RungInfo(f"L2-d{d}", f"optim.lr={lr:g}", f"optim.lr={lr:g}/L2-d{d}", 2, d, d // 16, d * d, d * d,
                            6.0 * d * d, 10, 20480, lr)  # fmt: skip
            done = loss is not None
            out.append(Outcome(info, "done" if done else "partial", 10 if done else 5, loss, None, []))
    return out


# d32's best is 3e-3 and d64's 1e-2, but their mean is lowest at 3e-3: (3.0 + 3.1) / 2 = 3.05 against
# (3.2 + 2.95) / 2 = 3.075 at 1e-2 and 3.9 at 1e-3. d128 at 3e-3 then ends 2.52 against its best 2.50.
HAND = {32: [4.0, 3.0, 3.2], 64: [3.8, 3.1, 2.95], 128: [3.0, 2.52, 2.50]}


def test_the_predictive_check_picks_the_lowest_mean_of_the_two_narrowest_and_measures_the_widest() -> None:
    report = sweep_report(_outcomes(HAND))
    p = report.prediction
    assert p is not None
    assert (p.picked_at, p.lr, p.picked_loss, p.widest) == (["L2-d32", "L2-d64"], 3e-3, pytest.approx(3.05), "L2-d128")
    assert (p.loss, p.best_lr, p.best_loss, p.settled) == (2.52, 1e-2, 2.50, True)
    assert p.gap == pytest.approx(0.008) and p.passed is True
    assert report.transfer is not None and report.transfer.spread == 1 and report.transfer.holds  # grid 1, 2, 2
    lines = report_lines(report)
    assert (
        "learning-rate transfer (the best lr is the same grid point or the next at every width): yes, 1 grid"
        in lines[0]
    )
    assert "(L2-d32 0.003, L2-d64 0.01, L2-d128 0.01)" in lines[0]
    assert lines[1].endswith(
        "lr 0.003 picked at L2-d32 and L2-d64 (their lowest mean final loss, 3.0500); L2-d128 at it 2.5200, "
        "its best 2.5000 (lr 0.01): +0.80%, within 1%: PASS"
    )
    saved = json.loads(json.dumps(report.to_json()))
    assert saved["lr_prediction"]["gap"] == pytest.approx(0.008) and saved["lr_prediction"]["passed"] is True
    assert saved["lr_transfer"] == {"grid": GRID, "best": {"L2-d32": 3e-3, "L2-d64": 1e-2, "L2-d128": 1e-2},
                                    "spread": 1, "holds": True}  # fmt: skip


def test_the_predictive_check_fails_past_one_percent_and_waits_for_the_widest_row() -> None:
    worse = sweep_report(_outcomes({**HAND, 128: [3.0, 2.53, 2.50]})).prediction  # 2.53 / 2.50 = 1.012
    assert worse is not None and worse.gap == pytest.approx(0.012) and worse.passed is False
    unsettled = sweep_report(_outcomes({**HAND, 128: [3.0, 2.52, None]})).prediction  # 1e-2 still training
    assert unsettled is not None and (unsettled.best_loss, unsettled.gap, unsettled.passed) == (2.52, 0.0, None)
    assert report_lines(sweep_report(_outcomes({**HAND, 128: [3.0, 2.52, None]})))[1].endswith("within 1%: so far")
    pending = sweep_report(_outcomes({**HAND, 128: [3.0, None, 2.50]})).prediction
    assert pending is not None and pending.loss is None and pending.passed is None
    assert sweep_report(_outcomes({32: HAND[32], 64: HAND[64]})).prediction is None  # no wider width to check


def test_transfer_fails_when_the_best_moves_two_grid_points() -> None:
    """The standard parametrization's pattern: narrow widths best at large learning rates, wide at small."""
    report = sweep_report(_outcomes({32: [4.0, 3.2, 3.0], 64: [3.5, 3.1, 3.3], 128: [2.4, 2.6, 3.4]}))
    assert report.transfer is not None and (report.transfer.spread, report.transfer.holds) == (2, False)
    assert ": NO, 2 grid step(s) apart (L2-d32 0.01, L2-d64 0.003, L2-d128 0.001)" in report_lines(report)[0]


def test_a_plain_mup_ladder_keeps_the_learning_rate_at_every_width(capsys: pytest.CaptureFixture[str]) -> None:
    """μP transfers optim.lr across width itself (each group's lr_scale), so the ladder's width rule, which
    scales the standard parametrization's rate by d_ref / d_model, must not apply on top of it."""
    cpu = str(Path(__file__).resolve().parents[1] / "configs" / "ladder-cpu.yaml")
    common = ["optim.lr=1e-3", "run.dir=/nonexistent/x", "--launch", "--procs", "1", "--dry-run"]

    def rung_lrs(*extra: str) -> list[float]:
        assert main(["ladder", cpu, *extra, *common]) == 0
        out = capsys.readouterr().out
        commands = [line for line in out.splitlines() if "--module scalegpt train" in line]
        assert len(commands) == 5, out
        return [float(c.split("optim.lr=")[-1].split()[0]) for c in commands]

    standard = rung_lrs()
    assert standard[-1] == pytest.approx(1e-3) and standard[0] == pytest.approx(1e-3 * 128 / 32)
    mup = rung_lrs("model.parametrization=mup", "model.mup_base_d_model=32", "model.mup_base_d_head=16")
    assert mup == [pytest.approx(1e-3)] * 5
