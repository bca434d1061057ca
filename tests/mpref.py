"""High-precision references (mpmath, which torch's sympy brings) shared by the tests."""

from __future__ import annotations

import pytest


def mp_sample_dist0(loc, v, c):
    """d(0, loc ⊕ exp0(v/2)) in 400-digit arithmetic (mpmath), one sample."""
    mp = pytest.importorskip("mpmath")
    with mp.workdps(400):  # 1 - sqrt(c)|z| reaches e^-300
        c = mp.mpf(c)  # (a Python float squared rounds: points would leave the ball)
        sc = mp.sqrt(c)
        x = [mp.mpf(float(t)) for t in loc]
        vn = mp.sqrt(sum(mp.mpf(float(t)) ** 2 for t in v))
        if vn == 0:
            y = [mp.mpf(0)] * len(x)
        else:
            y = [mp.tanh(sc * vn / 2) * mp.mpf(float(t)) / (sc * vn) for t in v]
        xy = sum(a * b for a, b in zip(x, y, strict=True))
        x2, y2 = sum(a * a for a in x), sum(b * b for b in y)
        den = 1 + 2 * c * xy + c**2 * x2 * y2
        z = [
            ((1 + 2 * c * xy + c * y2) * a + (1 - c * x2) * b) / den
            for a, b in zip(x, y, strict=True)
        ]
        return float(2 / sc * mp.atanh(sc * mp.sqrt(sum(t * t for t in z))))
