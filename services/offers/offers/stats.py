"""The statistics of the campaign report, in plain Python (no scipy in the project's dependencies).

Student's t distribution through the regularized incomplete beta function (a continued fraction),
its quantile by bisection; Welch's t interval with the Welch-Satterthwaite degrees of freedom; the
relative lift's interval by the delta method; percentile capping; CUPED; the sample-ratio test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist, fmean


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` (> 0, not necessarily whole) degrees of freedom."""
    if df <= 0 or math.isnan(df):
        raise ValueError("df must be positive")
    if math.isinf(df) or df > 1e7:
        return NormalDist().cdf(t)
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The `p` quantile of Student's t with `df` degrees of freedom (bisection on the CDF, to 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError("p must be in (0, 1)")
    if math.isinf(df) or df > 1e7:
        return NormalDist().inv_cdf(p)
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    lo, hi = 0.0, max(1.0, 2.0 * NormalDist().inv_cdf(p))
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2.0


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0-100) by linear interpolation between order statistics (R's type 7,
    numpy's default, `statistics.quantiles(method="inclusive")`)."""
    if not values:
        raise ValueError("no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    i = math.floor(pos)
    if i >= len(xs) - 1:
        return xs[-1]
    return xs[i] + (xs[i + 1] - xs[i]) * (pos - i)


def capped(values: Sequence[float], q: float) -> tuple[list[float], float | None]:
    """The values with every one above their `q`-th percentile set to it (winsorised from above)."""
    if not values or q >= 100:
        return list(values), None
    cap = percentile(values, q)
    return [min(v, cap) for v in values], cap


def variance(values: Sequence[float]) -> float:
    """The sample variance (n - 1)."""
    m = fmean(values)
    return sum((v - m) ** 2 for v in values) / (len(values) - 1)


@dataclass(frozen=True, slots=True)
class Interval:
    estimate: float
    low: float
    high: float
    se: float
    df: float


def welch(treated: Sequence[float], control: Sequence[float], level: float = 0.95) -> Interval | None:
    """The difference of means (treated - control) with Welch's t interval; None below two per arm."""
    nt, nc = len(treated), len(control)
    if nt < 2 or nc < 2:
        return None
    vt, vc = variance(treated) / nt, variance(control) / nc
    diff = fmean(treated) - fmean(control)
    se2 = vt + vc
    if se2 == 0:
        return Interval(diff, diff, diff, 0.0, float(nt + nc - 2))
    df = se2 * se2 / (vt * vt / (nt - 1) + vc * vc / (nc - 1))
    half = t_quantile(0.5 + level / 2.0, df) * math.sqrt(se2)
    return Interval(diff, diff - half, diff + half, math.sqrt(se2), df)


def relative_lift(treated: Sequence[float], control: Sequence[float], level: float = 0.95) -> Interval | None:
    """mean(treated) / mean(control) - 1 with the delta-method interval (first-order, independent
    arms: Var(T/C) ~ Var(T)/C^2 + T^2 Var(C)/C^4), the t quantile at the Welch df."""
    w = welch(treated, control, level)
    mc = fmean(control) if control else 0.0
    if w is None or mc == 0:
        return None
    mt = fmean(treated)
    vt, vc = variance(treated) / len(treated), variance(control) / len(control)
    se = math.sqrt(vt / mc**2 + mt**2 * vc / mc**4)
    lift = mt / mc - 1.0
    half = t_quantile(0.5 + level / 2.0, w.df) * se if se > 0 else 0.0
    return Interval(lift, lift - half, lift + half, se, w.df)


def cuped(
    y_t: Sequence[float], x_t: Sequence[float], y_c: Sequence[float], x_c: Sequence[float]
) -> tuple[list[float], list[float], float]:
    """CUPED: y - theta (x - mean x), theta = cov(y, x) / var(x) over both arms pooled (so the
    adjustment is the same for both and the difference of means stays unbiased)."""
    ys, xs = list(y_t) + list(y_c), list(x_t) + list(x_c)
    if len(xs) < 2:
        return list(y_t), list(y_c), 0.0
    mx, my = fmean(xs), fmean(ys)
    vx = sum((x - mx) ** 2 for x in xs)
    theta = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / vx if vx > 0 else 0.0
    return (
        [y - theta * (x - mx) for y, x in zip(y_t, x_t, strict=True)],
        [y - theta * (x - mx) for y, x in zip(y_c, x_c, strict=True)],
        theta,
    )


def sample_ratio(n_treated: int, n_control: int, control_share: float) -> tuple[float, float] | None:
    """Pearson's chi-square (1 df) of the observed split against the configured control share, and
    its p-value (erfc(sqrt(chi2 / 2))); None when it cannot be tested."""
    n = n_treated + n_control
    if n == 0 or not 0.0 < control_share < 1.0:
        return None
    ec, et = n * control_share, n * (1.0 - control_share)
    chi2 = (n_control - ec) ** 2 / ec + (n_treated - et) ** 2 / et
    return chi2, math.erfc(math.sqrt(chi2 / 2.0))
