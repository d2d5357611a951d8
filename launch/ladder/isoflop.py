"""The fits of `scalegpt ladder CONFIG --isoflop C1,C2,...`: Chinchilla's Approach 2 (Hoffmann et al. 2022,
Section 3.2). numpy only.

Per budget C, the final validation losses of the sizes trained on C FLOPs each are fitted with a parabola in
log N (np.polyfit, degree 2). Its vertex gives the best size N_opt(C) and its loss L_opt(C); a vertex outside
the sizes tried is an extrapolation of the parabola, so it is flagged and left out of the fits across
budgets. The tokens of the best size follow from the budget: D_opt(C) = C / FLOPs-per-token(N_opt), the
FLOPs per token interpolated in log-log between the sizes tried (model/flops.py's 6N + 12·L·d·T). Across
budgets, log N_opt = a log C + c and log D_opt = b log C + c' by ordinary least squares (fit.py's
fit_power_law), and L_opt = k·C^e for the loss the fits predict.

Were FLOPs per token exactly 6N, log N_opt + log D_opt = log C - log 6 at every budget and a + b = 1
exactly; the attention term 12·L·d·T is what moves a + b off 1. The slopes' standard errors are the usual
OLS ones, sqrt(s² / Σ(x - x̄)²) with s² the residual sum of squares over n - 2: with three budgets one
degree of freedom is left, so an error rests on one residual and says little; with two there is none and
no error is given. a + b's own error comes from fitting log(N_opt·D_opt) against log C, which carries the
covariance of a and b (they share the same N_opt); `a_plus_b_within` compares a + b - 1 with a's and b's
errors combined, sqrt(σa² + σb²), as the issue's "a + b is 1 within their errors" reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .fit import fit_power_law
from .results import Outcome

CAVEAT = (
    "These exponents describe these tiny models trained on this data with this recipe; they are not "
    "Chinchilla's (its Approach 2 gives a = 0.49 and b = 0.51 for models of 70M to 16B parameters, up to "
    "about 1e22 FLOPs) and do not predict them."
)

MIN_BUDGETS = 2
"""A line through log N_opt against log C needs two budgets (three for its error)."""


@dataclass(frozen=True)
class Scaling:
    """y = prefactor · C^exponent, with the exponent's standard error (None with no degree of freedom)."""

    prefactor: float
    exponent: float
    exponent_err: float | None
    r2: float
    """Coefficient of determination of log y."""
    points: int

    def __call__(self, c: np.ndarray | float) -> np.ndarray | float:
        return self.prefactor * np.power(c, self.exponent)

    @classmethod
    def fit(cls, c: list[float], y: list[float]) -> Scaling:
        law = fit_power_law(c, y)  # y = a · C^-b
        return cls(law.a, -law.b, law.b_err, law.r2, law.points)

    def formula(self, var: str, exponent: str) -> str:
        err = f" ± {self.exponent_err:.3f}" if self.exponent_err is not None else " (no error: 2 budgets)"
        return f"{var} = {self.prefactor:.4g}·C^{exponent}, {exponent} = {self.exponent:.4f}{err}, R² = {self.r2:.4f}"

    def to_json(self) -> dict[str, Any]:
        return vars(self).copy()

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Scaling:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Curve:
    """One budget's IsoFLOP curve: the finished sizes, the parabola in log N and its vertex."""

    budget: float
    names: list[str]
    params: list[int]
    losses: list[float]
    coef: list[float] | None
    """[p2, p1, p0] of loss = p2·(ln N)² + p1·ln N + p0; None with fewer than three sizes."""
    n_opt: float | None
    """The vertex's N; None when the parabola opens downwards (no minimum)."""
    loss_opt: float | None
    d_opt: float | None
    """budget / FLOPs per token at n_opt."""
    flops_per_token_opt: float | None
    inside: bool
    """Whether n_opt lies within the sizes tried (the smallest to the largest N)."""
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return vars(self).copy()


def flops_per_token_at(n: float, params: list[int], fpts: list[float]) -> float:
    """FLOPs per token at a size between (or beyond) those tried: piecewise linear in log-log through the
    sizes' own values, continued along the end segments."""
    x, y = np.log(np.asarray(params, dtype=float)), np.log(np.asarray(fpts, dtype=float))
    order = np.argsort(x)
    x, y = x[order], y[order]
    u = math.log(n)
    i = int(np.clip(np.searchsorted(x, u) - 1, 0, len(x) - 2))
    slope = (y[i + 1] - y[i]) / (x[i + 1] - x[i])
    return math.exp(float(y[i] + slope * (u - x[i])))


def fit_curve(budget: float, outcomes: list[Outcome]) -> Curve:
    """The parabola of final validation loss against ln N of one budget's finished sizes, and its vertex."""
    done = sorted((o for o in outcomes if o.finished), key=lambda o: o.info.params)
    names, params = [o.info.name for o in done], [o.info.params for o in done]
    losses = [float(o.val_loss) for o in done]  # type: ignore[arg-type]
    if len(done) < 3:
        note = f"{len(done)} finished size(s): a parabola needs 3"
        return Curve(budget, names, params, losses, None, None, None, None, None, False, note)
    p2, p1, p0 = (float(v) for v in np.polyfit(np.log(params), losses, 2))
    if p2 <= 0:
        note = "the losses bend downwards (the parabola has no minimum): try smaller and larger sizes"
        return Curve(budget, names, params, losses, [p2, p1, p0], None, None, None, None, False, note)
    u = -p1 / (2 * p2)
    n_opt, loss_opt = math.exp(u), p0 - p1 * p1 / (4 * p2)
    fpt = flops_per_token_at(n_opt, params, [o.info.flops_per_token for o in done])
    inside = params[0] <= n_opt <= params[-1]
    note = "" if inside else f"the minimum at N = {n_opt:.3g} is outside the sizes tried: an extrapolation, left out"
    return Curve(budget, names, params, losses, [p2, p1, p0], n_opt, loss_opt, budget / fpt, fpt, inside, note)


@dataclass(frozen=True)
class IsoflopFit:
    """Every budget's curve, and N_opt, D_opt and L_opt against C across the budgets whose minimum is inside."""

    curves: list[Curve]
    used: list[float] = field(default_factory=list)
    """The budgets in the fits across budgets."""
    n_opt: Scaling | None = None
    d_opt: Scaling | None = None
    loss: Scaling | None = None
    a_plus_b_err: float | None = None
    """From the fit of log(N_opt·D_opt) against log C (see the module docstring)."""
    attention_shift: float | None = None
    """How much of a + b - 1 the FLOPs per token beyond 6N make: minus the slope of log(FLOPs per token /
    N_opt) against log C. Since D_opt = C / FLOPs per token, a + b - 1 equals it up to rounding; it is
    reported to say where a + b's distance from 1 comes from, not as a check."""
    note: str = ""

    @property
    def a_plus_b(self) -> float | None:
        return None if self.n_opt is None or self.d_opt is None else self.n_opt.exponent + self.d_opt.exponent

    @property
    def a_plus_b_within(self) -> bool | None:
        """|a + b - 1| within sqrt(σa² + σb²); None without errors."""
        if self.n_opt is None or self.d_opt is None or self.n_opt.exponent_err is None:
            return None
        combined = math.hypot(self.n_opt.exponent_err, self.d_opt.exponent_err or 0.0)
        return abs(self.a_plus_b - 1.0) <= combined  # type: ignore[operator]

    def to_json(self) -> dict[str, Any]:
        return {
            "curves": [c.to_json() for c in self.curves],
            "used": self.used,
            "n_opt": None if self.n_opt is None else self.n_opt.to_json(),
            "d_opt": None if self.d_opt is None else self.d_opt.to_json(),
            "loss": None if self.loss is None else self.loss.to_json(),
            "a": None if self.n_opt is None else self.n_opt.exponent,
            "b": None if self.d_opt is None else self.d_opt.exponent,
            "a_plus_b": self.a_plus_b,
            "a_plus_b_err": self.a_plus_b_err,
            "a_plus_b_within_errors": self.a_plus_b_within,
            "attention_shift": self.attention_shift,
            "all_minima_inside": all(c.inside for c in self.curves),
            "note": self.note,
        }


def fit_isoflop(budgets: list[float], outcomes: list[Outcome]) -> IsoflopFit:
    """One curve per budget (its rungs are those whose info.budget is it), then the fits across budgets."""
    curves = [fit_curve(b, [o for o in outcomes if o.info.budget == b]) for b in budgets]
    good = [c for c in curves if c.inside]
    if len(good) < MIN_BUDGETS:
        note = f"{len(good)} budget(s) with a minimum inside their sizes: the fits across budgets need {MIN_BUDGETS}"
        return IsoflopFit(curves, note=note)
    cs = [c.budget for c in good]
    n_opt = Scaling.fit(cs, [c.n_opt for c in good])  # type: ignore[misc]
    d_opt = Scaling.fit(cs, [c.d_opt for c in good])  # type: ignore[misc]
    loss = Scaling.fit(cs, [c.loss_opt for c in good])  # type: ignore[misc]
    product = Scaling.fit(cs, [c.n_opt * c.d_opt for c in good])  # type: ignore[operator]
    overhead = Scaling.fit(cs, [c.flops_per_token_opt / c.n_opt for c in good])  # type: ignore[operator]
    return IsoflopFit(curves, cs, n_opt, d_opt, loss, product.exponent_err, -overhead.exponent)


def isoflop_lines(fit: IsoflopFit) -> list[str]:
    """The table `scalegpt ladder --isoflop` prints: each budget's vertex, then the fits across budgets."""
    lines = [
        "  IsoFLOP curves: a parabola of final validation loss against ln N per budget, and its minimum",
        f"    {'budget C':>10} {'sizes':>5} {'N_opt':>10} {'D_opt':>10} {'D/N':>6} {'L_opt':>8}  inside",
    ]
    for c in fit.curves:
        if c.n_opt is None:
            lines.append(f"    {c.budget:>10.3g} {len(c.params):>5}  {c.note}")
            continue
        d_over_n = c.d_opt / c.n_opt  # type: ignore[operator]
        lines.append(
            f"    {c.budget:>10.3g} {len(c.params):>5} {c.n_opt:>10.4g} {c.d_opt:>10.4g} {d_over_n:>6.1f} "
            f"{c.loss_opt:>8.4f}  {'yes' if c.inside else 'NO: ' + c.note}"
        )
    if fit.n_opt is None or fit.d_opt is None or fit.loss is None:
        return [*lines, f"  IsoFLOP fits: {fit.note}"]
    lines += [
        f"  IsoFLOP fits over {len(fit.used)} budgets (standard errors with {len(fit.used) - 2} degree(s) of freedom):",
        f"    {fit.n_opt.formula('N_opt', 'a')}",
        f"    {fit.d_opt.formula('D_opt', 'b')}",
        f"    {fit.loss.formula('L_opt', 'e')}",
    ]
    total = f"    a + b = {fit.a_plus_b:.4f}"
    if fit.a_plus_b_err is not None:
        within = "within" if fit.a_plus_b_within else "NOT within"
        combined = math.hypot(fit.n_opt.exponent_err or 0.0, fit.d_opt.exponent_err or 0.0)
        total += f" ± {fit.a_plus_b_err:.4f}: 1 is {within} a's and b's errors combined (± {combined:.4f})"
    lines.append(total)
    if fit.attention_shift is not None:
        lines.append(
            f"    the FLOPs per token beyond 6N (attention, 12·L·d·T) make {fit.attention_shift:+.4f} of a + b - 1: "
            "with 6N alone, D_opt = C / 6N_opt and a + b = 1 exactly"
        )
    return lines
