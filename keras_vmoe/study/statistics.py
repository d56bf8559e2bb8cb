"""Paired differences between models over the same seeds, with t intervals.

Two models trained with the same seeds share the seed's data order, head
initialisation and shot draws, so their per-seed scores are paired: the
interval of the mean difference uses the spread of the per-seed differences
(a paired t interval), which is much narrower than comparing two means.
"""

import dataclasses
import math

import numpy as np
from scipy import stats


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """Mean of `model - baseline` over paired seeds and its t interval.

    Attributes:
        mean: float. Mean per-seed difference.
        low, high: float or None. The `confidence` interval of the mean
            difference (None with fewer than two pairs: no spread to use).
        num_pairs: int. Seeds with a value for both models.
        confidence: float. Coverage of the interval, e.g. 0.95.
    """

    mean: float
    low: float | None
    high: float | None
    num_pairs: int
    confidence: float

    @property
    def resolved(self):
        """True when the interval excludes 0 (the sign of the difference is known)."""
        if self.low is None:
            return False
        return self.low > 0 or self.high < 0

    def as_dict(self):
        return dataclasses.asdict(self)


def paired_difference(values, baseline, confidence=0.95):
    """The paired difference `values - baseline` with its t interval.

    `values[i]` and `baseline[i]` are the two models' scores for seed `i`;
    seeds where either is missing (None or NaN) are left out.

    Args:
        values: sequence of float or None, one per seed.
        baseline: sequence of float or None, same length.
        confidence: float in (0, 1). Coverage of the interval.

    Returns:
        `PairedDifference`, or None when no seed has both values.

    Example (differences 0.02, 0.04, 0.00: mean 0.02, sample std 0.02,
    standard error 0.02 / sqrt(3) = 0.011547, t(0.975, 2 dof) = 4.302653,
    half-width 0.049683):
    >>> d = paired_difference([0.82, 0.84, 0.80], [0.80, 0.80, 0.80])
    >>> round(d.mean, 6), round(d.low, 6), round(d.high, 6), d.resolved
    (0.02, -0.029683, 0.069683, False)
    """
    if len(values) != len(baseline):
        raise ValueError(
            f"`values` and `baseline` need one entry per seed each; got "
            f"{len(values)} and {len(baseline)}."
        )
    if not 0 < confidence < 1:
        raise ValueError(f"`confidence` must be in (0, 1); got {confidence}.")
    differences = [
        float(v) - float(b)
        for v, b in zip(values, baseline)
        if _present(v) and _present(b)
    ]
    if not differences:
        return None
    mean = float(np.mean(differences))
    n = len(differences)
    if n < 2:
        return PairedDifference(round(mean, 12), None, None, n, confidence)
    half_width = half_width_of(np.std(differences, ddof=1), n, confidence)
    return PairedDifference(
        round(mean, 12),
        round(mean - half_width, 12),
        round(mean + half_width, 12),
        n,
        confidence,
    )


def half_width_of(std, num_pairs, confidence=0.95):
    """Half-width of the t interval of a mean of `num_pairs` values of spread `std`.

    Also the smallest mean difference a run of `num_pairs` seeds resolves when
    the per-seed differences scatter by `std`.

    Example (t(0.975, 3 dof) = 3.182446; 3.182446 * 0.01 / 2 = 0.015912):
    >>> round(half_width_of(0.01, 4), 6)
    0.015912
    """
    if num_pairs < 2:
        return math.inf
    t = float(stats.t.ppf(0.5 + confidence / 2, df=num_pairs - 1))
    return t * float(std) / math.sqrt(num_pairs)


def _present(value):
    return value is not None and not math.isnan(float(value))
