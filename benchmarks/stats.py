"""What the accuracy benchmarks share: the FLARE22 scores of a folder of predictions, rank statistics and
Student-t intervals of paired differences."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Sequence


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (ties get mean ranks); NaN for fewer than 3 points or a constant input."""
    if len(x) != len(y):
        raise ValueError("x and y differ in length")
    if len(x) < 3:
        return float("nan")
    from scipy.stats import spearmanr

    if len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(score of a random positive (hard) case > that of a random negative one), ties half; NaN if a side is
    empty."""
    if not positive or not negative:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean over `values` (NaNs dropped); NaN bounds for n < 2."""
    ok = [v for v in values if not math.isnan(v)]
    if not ok:
        return float("nan"), float("nan"), float("nan")
    mean = statistics.fmean(ok)
    if len(ok) < 2:
        return mean, float("nan"), float("nan")
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, len(ok) - 1)) * statistics.stdev(ok) / math.sqrt(len(ok))
    return mean, mean - half, mean + half


def resolvable(values: Sequence[float], power: float = 0.8, level: float = 0.95) -> float:
    """The smallest true mean difference a paired design with this spread detects with `power` (two-sided test at
    1 - level): (t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n); NaN for n < 2."""
    ok = [v for v in values if not math.isnan(v)]
    if len(ok) < 2:
        return float("nan")
    from scipy.stats import t

    n = len(ok)
    return float(t.ppf(0.5 + level / 2, n - 1) + t.ppf(power, n - 1)) * statistics.stdev(ok) / math.sqrt(n)


def evaluate_row(pred_dir: Path, gt_dir: Path, out_csv: Path) -> dict[str, Any]:
    """FLARE22 DSC/NSD of one row's predictions: mean over organs and cases, and per case."""
    from common.core.labels import FLARE22
    from common.evaluation.evaluate import column_means, evaluate_folder

    rows, means = evaluate_folder(pred_dir, gt_dir, out_csv)
    per_case = {}
    for r in rows:
        case = column_means([r])  # a case's mean over its organs, NaN skipped, as the overall mean
        per_case[str(r["Name"])] = {"DSC": case["mean_DSC"], "NSD": case["mean_NSD"]}
    organs = {lb.short: {"DSC": means[f"{lb.short}_DSC"], "NSD": means[f"{lb.short}_NSD"]} for lb in FLARE22}
    return {"DSC": means["mean_DSC"], "NSD": means["mean_NSD"], "cases": len(rows), "per_case": per_case,
            "per_organ": organs}

