"""Type checks shared by the readers of stored records and the API argument checks."""

from __future__ import annotations

from typing import Any

import numpy as np


def is_whole(value: Any, minimum: int | None = None) -> bool:
    """An int (numpy integers included, bools not), at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        return False
    return minimum is None or bool(value >= minimum)
