"""`scalegpt ladder --isoflop`: the fits recover a known IsoFLOP minimum and known scaling exponents, with
honest standard errors; the default sizes bracket Chinchilla's guess; the plan gives each size its budget's
tokens under C=BUDGET/; bad budgets are one error line; and one budget trains end to end through the real
command, its parabola equal to one recomputed from ladder.json."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from scalegpt.launch.cli import main
from scalegpt.launch.ladder.figure import isoflop_figure
from scalegpt.launch.ladder.isoflop import CAVEAT, fit_curve, fit_isoflop, flops_per_token_at, isoflop_lines
from scalegpt.launch.ladder.plan import RungInfo, SizeRule, isoflop_sizes, shape_params
from scalegpt.launch.ladder.results import Outcome
from scalegpt.model.flops import flops_per_token
from scalegpt.train.config.loading import load_config

from conftest import CONFIGS
from e2e import SMALL_DATA, SMOKE, scalegpt
from helpers import one_error_line

CPU = str(CONFIGS / "isoflop-cpu.yaml")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rung(budget: float, n: float, loss: float, fpt: float | None = None) -> Outcome:
    params = round(n)
    fpt = 6.0 * params if fpt is None else fpt
    tokens = round(budget / fpt)
    info = RungInfo(
        f"n{params}",
        f"C={budget:g}",
        f"C={budget:g}/n{params}",
        1,
        32,
        1,
        params,
        params,
        fpt,
        10,
        tokens,
        1e-3,
        budget,
    )
    return Outcome(info, "done", 10, loss, None, [(tokens, loss)])


def _curve_outcomes(budget: float, n_opt: float, loss_opt: float, width: float = 0.08) -> list[Outcome]:
    """Five sizes spaced by sqrt(2) around n_opt (off centre), losses an exact parabola in ln N."""
    sizes = np.round(n_opt * 2.0 ** (np.arange(-2, 3) / 2 + 0.3))  # whole parameters, as rungs have
    return [_rung(budget, n, loss_opt + width * math.log(n / n_opt) ** 2) for n in sizes]


def _below(budget: float, n_opt: float, loss_opt: float) -> list[Outcome]:
    """Three sizes, all smaller than n_opt: the parabola's minimum lies beyond them."""
    sizes = np.round(n_opt * np.array([0.2, 0.3, 0.45]))
    return [_rung(budget, n, loss_opt + 0.08 * math.log(n / n_opt) ** 2) for n in sizes]


# -- one curve ------------------------------------------------------------------------------------------------
def test_a_parabola_in_log_n_gives_back_its_vertex() -> None:
    curve = fit_curve(1e12, _curve_outcomes(1e12, 50_000.0, 3.2))
    assert curve.n_opt == pytest.approx(50_000.0, rel=1e-6) and curve.loss_opt == pytest.approx(3.2, abs=1e-9)
    assert curve.inside and curve.note == ""
    assert curve.d_opt == pytest.approx(1e12 / (6 * 50_000.0), rel=1e-4)  # FLOPs per token 6N, interpolated

    beyond = fit_curve(1e12, _below(1e12, 50_000.0, 3.2))
    assert beyond.n_opt == pytest.approx(50_000.0, rel=1e-6)  # three sizes all below the minimum
    assert not beyond.inside and "outside the sizes tried" in beyond.note

    falling = [_rung(1e12, n, 4.0 - 0.1 * math.log(n) ** 2 / 100) for n in (1e4, 2e4, 4e4)]
    concave = fit_curve(1e12, falling)
    assert concave.n_opt is None and "no minimum" in concave.note
    assert "a parabola needs 3" in fit_curve(1e12, falling[:2]).note


def test_flops_per_token_between_sizes_is_log_linear_through_theirs() -> None:
    params, fpts = [1e4, 4e4, 1.6e5], [7e4, 2.6e5, 1.0e6]
    assert flops_per_token_at(4e4, params, fpts) == pytest.approx(2.6e5)
    mid = math.exp((math.log(7e4) + math.log(2.6e5)) / 2)  # halfway in log N is halfway in log FLOPs
    assert flops_per_token_at(2e4, params, fpts) == pytest.approx(mid)
    assert flops_per_token_at(3.2e5, params, fpts) > 1.0e6  # continued past the largest, not clamped


# -- across budgets -------------------------------------------------------------------------------------------
def _ladder(budgets: np.ndarray, a: float, noise: float, seed: int = 0) -> list[Outcome]:
    rng = np.random.default_rng(seed)
    out: list[Outcome] = []
    for c in budgets:
        n_opt = 0.2 * c**a * math.exp(rng.normal(0.0, noise))
        out += _curve_outcomes(c, n_opt, 12.0 * c**-0.06)
    return out


def test_the_fits_recover_known_exponents_and_a_plus_b_is_one() -> None:
    budgets = np.geomspace(1e11, 1e14, 4)
    exact = fit_isoflop(list(budgets), _ladder(budgets, 0.45, 0.0))
    assert exact.n_opt.exponent == pytest.approx(0.45, abs=1e-6)  # type: ignore[union-attr]
    assert exact.n_opt.prefactor == pytest.approx(0.2, rel=1e-4)  # type: ignore[union-attr]
    assert exact.d_opt.exponent == pytest.approx(0.55, abs=1e-6)  # type: ignore[union-attr]  # D = C / 6N
    assert exact.loss.exponent == pytest.approx(-0.06, abs=1e-6)  # type: ignore[union-attr]
    assert exact.a_plus_b == pytest.approx(1.0, abs=1e-9) and exact.used == list(budgets)

    noisy = fit_isoflop(list(budgets[:3]), _ladder(budgets[:3], 0.45, 0.05, seed=3))
    a, b = noisy.n_opt, noisy.d_opt
    assert a is not None and b is not None and a.points == 3
    assert abs(a.exponent - 0.45) < 3 * a.exponent_err and 0 < a.exponent_err < 0.1  # type: ignore[operator]
    assert noisy.a_plus_b_within and noisy.a_plus_b == pytest.approx(1.0, abs=1e-9)

    # The slope's error is OLS's with n - 2 = 1 degree of freedom: recompute it with lstsq.
    x = np.log(budgets[:3])
    y = np.log([c.n_opt for c in noisy.curves])
    design = np.stack([x, np.ones_like(x)], axis=1)
    coef, rss, *_ = np.linalg.lstsq(design, y, rcond=None)
    se = math.sqrt(float(rss[0]) / 1 * np.linalg.inv(design.T @ design)[0, 0])
    assert a.exponent == pytest.approx(coef[0]) and a.exponent_err == pytest.approx(se)
    assert noisy.a_plus_b_err == pytest.approx(0.0, abs=1e-9)  # N·D = C/6 exactly: no scatter left

    lines = "\n".join(isoflop_lines(noisy))
    assert f"a = {a.exponent:.4f} ± {a.exponent_err:.3f}" in lines and "1 degree(s) of freedom" in lines


def test_the_attention_term_moves_a_plus_b_off_one() -> None:
    """FLOPs per token 6N + a term that grows more slowly than N: larger models spend relatively fewer FLOPs
    per token on it, so D_opt grows a little faster than C / 6N_opt would, and a + b exceeds 1."""
    budgets = np.geomspace(1e11, 1e14, 3)
    out = []
    for c in budgets:
        n_opt = 0.2 * c**0.5
        sizes = np.round(n_opt * 2.0 ** (np.arange(-2, 3) / 2 + 0.3))
        out += [_rung(c, n, 3.0 + 0.08 * math.log(n / n_opt) ** 2, 6 * n + 2e3 * n**0.5) for n in sizes]
    fit = fit_isoflop(list(budgets), out)
    assert fit.a_plus_b > 1.0 and fit.n_opt.exponent == pytest.approx(0.5, abs=1e-6)  # type: ignore[operator,union-attr]
    # where it comes from: d ln(FLOPs per token / N) / d ln C at N_opt = 0.5 C^0.5, computed by hand
    n = 0.2 * budgets**0.5
    ratio = (6 * n + 2e3 * n**0.5) / n
    slope = np.polyfit(np.log(budgets), np.log(ratio), 1)[0]
    assert fit.attention_shift == pytest.approx(-slope, rel=1e-3)
    assert fit.a_plus_b - 1 == pytest.approx(fit.attention_shift, abs=1e-9)  # type: ignore[operator]


def test_a_budget_whose_minimum_is_outside_is_left_out_of_the_fits() -> None:
    budgets = [1e11, 1e12, 1e13]
    out = _ladder(np.array(budgets), 0.5, 0.0)
    shifted = [o for o in out if o.info.budget != 1e13] + _below(1e13, 1e9, 2.0)
    fit = fit_isoflop(budgets, shifted)
    assert fit.used == [1e11, 1e12] and not fit.curves[2].inside
    assert fit.n_opt is not None and fit.n_opt.exponent_err is None  # two budgets: no error
    assert fit.to_json()["all_minima_inside"] is False
    assert "NO: the minimum" in "\n".join(isoflop_lines(fit))


def test_the_figure_draws_each_parabola_and_both_fits() -> None:
    budgets = np.geomspace(1e11, 1e13, 3)
    fit = fit_isoflop(list(budgets), _ladder(budgets, 0.5, 0.02))
    fig = isoflop_figure(fit, title="t", caveat=CAVEAT)
    curves, n_ax, d_ax = fig.get_axes()
    assert [t.get_text() for t in curves.get_legend().get_texts()] == ["C = 1e+11", "C = 1e+12", "C = 1e+13"]
    assert sum(line.get_marker() == "*" for line in curves.get_lines()) == 3  # one minimum per budget
    assert n_ax.get_xscale() == n_ax.get_yscale() == "log"
    assert f"a = {fit.n_opt.exponent:.4f}" in n_ax.get_legend().get_texts()[0].get_text()  # type: ignore[union-attr]
    assert f"b = {fit.d_opt.exponent:.4f}" in d_ax.get_legend().get_texts()[0].get_text()  # type: ignore[union-attr]


# -- the sizes and the plan -------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [2e11, 1.8e12, 1e15])
def test_default_sizes_bracket_the_chinchilla_guess(budget: float) -> None:
    model = load_config(CPU).model
    rule = SizeRule(aspect=64, d_head=16)
    sizes = isoflop_sizes(model, rule, budget)
    params = [shape_params(model, rule.shape(s)) for s in sizes]
    guess = math.sqrt(budget / 120)
    assert len(sizes) == 5 and params == sorted(set(params))
    assert params[0] < guess < params[-1] and params[-1] / params[0] > 3


def test_the_plan_gives_each_size_its_budget_in_whole_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ladder = tmp_path / "iso"
    argv = ["ladder", CPU, f"run.dir={ladder}", "--isoflop", "6e11,2e11", "--launch", "--procs", "1", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("C=")]
    assert [r[0] for r in rows] == ["C=2e+11"] * 5 + ["C=6e+11"] * 5  # smallest budget first
    cfg = load_config(CPU)
    model, step = cfg.model, cfg.train.global_batch * cfg.model.n_ctx
    for r in rows:
        budget, (n_layer, d_model, n_head) = float(r[0][2:]), map(int, r[2:5])
        fpt = flops_per_token(replace(model, n_layer=n_layer, d_model=d_model, n_head=n_head))
        tokens = int(r[7].replace(",", ""))
        assert budget / fpt <= tokens < budget / fpt + step  # rounded up to a whole step
        assert float(r[10]) == pytest.approx(3e-3 * 128 / d_model, rel=1e-3)  # the ladder's width rule
    commands = [line for line in out.splitlines() if "--module scalegpt train" in line]
    assert len(commands) == 10 and f"run.dir={ladder}/C=2e+11/{rows[0][1]} " in commands[0]
    assert "IsoFLOP budgets 2e+11, 6e+11 FLOPs" in out and not ladder.exists()


def test_under_mup_every_size_keeps_the_configs_learning_rate(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    mup = ["model.parametrization=mup", "model.mup_base_d_model=32", "model.mup_base_d_head=16"]
    argv = [
        "ladder",
        CPU,
        f"run.dir={tmp_path / 'm'}",
        *mup,
        "--isoflop",
        "2e11",
        "--launch",
        "--procs",
        "1",
        "--dry-run",
    ]
    assert main(argv) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("C=")]
    assert len(rows) == 5 and {float(r[10]) for r in rows} == {3e-3}


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--isoflop", "1e12,abc"], "--isoflop '1e12,abc': 'abc' is not a number"),
        (["--isoflop", "1e12,-3e12"], "every budget must be a positive number of FLOPs, got -3e12"),
        (["--isoflop", "0"], "every budget must be a positive number of FLOPs, got 0"),
        (["--isoflop", "1e12,1e12"], "a budget is listed twice"),
        (["--isoflop", "1e6,1e12"], "--isoflop budget 1e+06 FLOPs is too small for size L1-d8"),
        (["--isoflop", "1e9", "--sizes", "32", "64", "128"], "too small for size L2-d128: at"),
        (["--isoflop", "1e12", "--sizes", "32", "64"], "a parabola per budget needs at least 3"),
        (["--isoflop", "1e12", "--lr-sweep", "1e-3,3e-3"], "give it, --axis or --lr-sweep, not more"),
        (["--isoflop", "1e12", "--tokens", "1e6"], "argument --tokens: not allowed with argument --isoflop"),
    ],
)
def test_bad_budgets_are_one_error_line_and_create_nothing(
    args: list[str], expect: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["ladder", CPU, f"run.dir={tmp_path / 'iso'}", *args])
    assert code == 2 and expect in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "iso").exists()


def test_a_budget_too_small_says_the_least_budget_that_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ladder", CPU, f"run.dir={tmp_path / 'iso'}", "--isoflop", "1e7", "--sizes", "8", "16", "24"]) == 2
    line = one_error_line(capsys.readouterr().err)
    cfg = load_config(CPU)
    fpt = flops_per_token(replace(cfg.model, n_layer=1, d_model=8, n_head=1))
    step = cfg.train.global_batch * cfg.model.n_ctx
    assert f"it buys {1e7 / fpt:.3g} tokens, less than one optimizer step ({step:,} tokens)" in line
    assert f"give budgets of at least {step * fpt:.3g} FLOPs" in line and not (tmp_path / "iso").exists()


# -- end to end -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_one_budget_trains_end_to_end_and_its_parabola_is_the_jsons(prepared: Path, tmp_path: Path) -> None:
    ladder = tmp_path / "iso"
    argv = ["ladder", SMOKE, f"run.dir={ladder}", f"data.dir={prepared}", *SMALL_DATA]
    argv += ["--isoflop", "1e10", "--sizes", "1x32", "1x64", "1x96", "--evals", "2", "--checkpoints", "1"]
    out = scalegpt(*argv, timeout=600).stdout
    summary = json.loads((ladder / "ladder.json").read_text())
    assert summary["isoflop"] == [1e10] and summary["fits"] == []
    rungs = summary["rungs"]
    assert [r["dir"] for r in rungs] == ["C=1e+10/L1-d32", "C=1e+10/L1-d64", "C=1e+10/L1-d96"]
    for r in rungs:
        assert r["status"] == "done" and r["budget"] == 1e10
        assert 1e10 <= r["tokens"] * r["flops_per_token"] < 1e10 + 2048 * r["flops_per_token"]
    (curve,) = summary["isoflop_fit"]["curves"]
    coef = np.polyfit(np.log([r["params"] for r in rungs]), [r["val_loss"] for r in rungs], 2)
    assert curve["coef"] == pytest.approx(list(coef), rel=1e-9) and curve["losses"] == [r["val_loss"] for r in rungs]
    if coef[0] > 0:
        assert curve["n_opt"] == pytest.approx(math.exp(-coef[1] / (2 * coef[0])), rel=1e-9)
    assert "IsoFLOP curves: a parabola" in out and "fits across budgets need 2" in out
    assert (ladder / "ladder.png").read_bytes().startswith(PNG_MAGIC)

    again = scalegpt(*argv).stdout  # finished rungs are not trained again
    assert again.count("finished earlier, not trained again") == 3 and ": training" not in again

    # one budget is no fit across budgets: plan --compute says to run the ladder
    done = scalegpt("plan", SMOKE, "--compute", "1e11", "--from", str(ladder), check=False)
    assert done.returncode == 2 and "has no IsoFLOP fit yet" in one_error_line(done.stderr)
