"""Power-law fits for `scalegpt ladder`: L(x) = a * x^(-b), and L(x) = a * x^(-b) + c, by least squares
on log L, so each point weighs by its relative error rather than by its size (a frontier's losses span a
factor of several, and a log-log plot is how it is read). numpy only: a two-parameter fit is a straight
line in log-log, and the three-parameter one needs nothing beyond a small Levenberg-Marquardt loop.

R^2 is that of log L, the space the fit minimizes, so the two forms compare on the same footing. The
exponent's uncertainty is one standard error from the fit's covariance (residual variance times the
inverse of J^T J), which assumes the points scatter independently about the curve: with four or five
rungs it says how well the exponent is pinned down, not more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .results import GroupFit, Outcome, PowerLaw

OFFSET_MIN_POINTS = 4
"""The offset form has three parameters: with four points one degree of freedom is left for its error."""


def _check(x: Sequence[float], y: Sequence[float], need: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x and y must be 1-D and the same length, got {xs.shape} and {ys.shape}")
    if len(xs) < need:
        raise ValueError(f"a fit needs at least {need} points, got {len(xs)}")
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys)) and np.all(xs > 0) and np.all(ys > 0)):
        raise ValueError("power-law fits need finite, positive x and y")
    if len(set(xs.tolist())) < 2:
        raise ValueError("a fit needs at least two distinct x values")
    return xs, ys


def _r2(log_y: np.ndarray, log_fit: np.ndarray) -> float:
    total = float(np.sum((log_y - log_y.mean()) ** 2))
    residual = float(np.sum((log_y - log_fit) ** 2))
    return 1.0 - residual / total if total > 0 else 1.0


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> PowerLaw:
    """L = a * x^(-b): ordinary least squares of log L on log x. Needs two points (three for an error)."""
    xs, ys = _check(x, y, 2)
    u, v = np.log(xs), np.log(ys)
    slope, intercept = np.polyfit(u, v, 1)
    fitted = intercept + slope * u
    n = len(u)
    err = None
    if n > 2:
        s2 = float(np.sum((v - fitted) ** 2)) / (n - 2)
        err = math.sqrt(s2 / float(np.sum((u - u.mean()) ** 2)))
    return PowerLaw("power", math.exp(intercept), -float(slope), 0.0, err, _r2(v, fitted), n)


def _offset_model(theta: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log(a e^(-b u) + c) with theta = (log a, b, c) and u = log x - its mean (for conditioning), and
    the Jacobian of it with respect to theta."""
    power = np.exp(theta[0] - theta[1] * u)
    total = power + theta[2]
    jac = np.stack([power / total, -u * power / total, 1.0 / total], axis=1)
    return np.log(total), jac


def _offset_start(u: np.ndarray, v: np.ndarray, y_min: float) -> np.ndarray:
    """The best straight line through log(L - c) over a grid of c in [0, min L): a start near the optimum."""
    best, best_rss = np.zeros(3), math.inf
    for c in np.linspace(0.0, 0.99 * y_min, 100):
        slope, intercept = np.polyfit(u, np.log(np.exp(v) - c), 1)
        theta = np.array([intercept, -slope, c])
        rss = float(np.sum((_offset_model(theta, u)[0] - v) ** 2))
        if rss < best_rss:
            best, best_rss = theta, rss
    return best


def fit_power_law_offset(x: Sequence[float], y: Sequence[float], *, iterations: int = 200) -> PowerLaw:
    """L = a * x^(-b) + c with 0 <= c < min L (an irreducible loss), by Levenberg-Marquardt on log L
    from the best grid start. Needs OFFSET_MIN_POINTS points."""
    xs, ys = _check(x, y, OFFSET_MIN_POINTS)
    center = float(np.mean(np.log(xs)))
    u, v = np.log(xs) - center, np.log(ys)
    c_max = 0.999 * float(ys.min())
    theta, damping = _offset_start(u, v, float(ys.min())), 1e-3
    rss = float(np.sum((_offset_model(theta, u)[0] - v) ** 2))
    for _ in range(iterations):
        fitted, jac = _offset_model(theta, u)
        jtj = jac.T @ jac
        step = np.linalg.solve(jtj + damping * np.diag(np.diag(jtj) + 1e-12), jac.T @ (v - fitted))
        trial = theta + step
        trial[2] = min(max(trial[2], 0.0), c_max)
        trial_rss = float(np.sum((_offset_model(trial, u)[0] - v) ** 2))
        if trial_rss < rss:
            converged = rss - trial_rss < 1e-15 * max(1.0, rss)
            theta, rss, damping = trial, trial_rss, damping / 3
            if converged:
                break
        else:
            damping *= 4
            if damping > 1e12:
                break
    fitted, jac = _offset_model(theta, u)
    n = len(u)
    err = None
    if n > 3:
        cov = np.linalg.pinv(jac.T @ jac) * rss / (n - 3)
        err = math.sqrt(max(float(cov[1, 1]), 0.0))
    a = math.exp(theta[0] + theta[1] * center)  # undo the centring: a e^(-b(log x - m)) = a e^(bm) x^-b
    return PowerLaw("power+offset", a, float(theta[1]), float(theta[2]), err, _r2(v, fitted), n)


def fit_both(x: Sequence[float], y: Sequence[float]) -> list[PowerLaw]:
    """The plain fit, and the offset fit too where there are enough points."""
    fits = [fit_power_law(x, y)]
    if len(x) >= OFFSET_MIN_POINTS:
        fits.append(fit_power_law_offset(x, y))
    return fits


def fit_group(axis_value: str | None, outcomes: list[Outcome]) -> GroupFit:
    """Fit the finished rungs of one frontier: final validation loss (and bits per byte) against the
    rung's training FLOPs C, and against its parameters N."""
    done = sorted((o for o in outcomes if o.finished), key=lambda o: o.info.params)
    losses = [o.val_loss for o in done if o.val_loss is not None]
    falls = all(a > b for a, b in zip(losses, losses[1:], strict=False))
    if len(done) < 2:
        note = f"{len(done)} finished rung(s): a fit needs at least 2"
        return GroupFit(axis_value, len(done), [], [], [], falls, note)
    flops = [o.info.flops for o in done]
    bpbs = [o.val_bpb for o in done]
    by_bpb = fit_both(flops, bpbs) if all(b is not None for b in bpbs) else []  # type: ignore[arg-type]
    return GroupFit(
        axis_value=axis_value,
        points=len(done),
        loss_vs_compute=fit_both(flops, losses),
        loss_vs_params=fit_both([o.info.params for o in done], losses),
        bpb_vs_compute=by_bpb,
        loss_falls_with_size=falls,
    )


def fit_all(outcomes: list[Outcome]) -> list[GroupFit]:
    groups: dict[str | None, list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault(o.info.axis_value, []).append(o)
    return [fit_group(value, group) for value, group in groups.items()]
