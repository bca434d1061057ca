import numpy as np
import pytest

from hypsegcli.checks import is_whole


@pytest.mark.parametrize(
    "value, minimum, expected",
    [
        (0, None, True),
        (-3, None, True),
        (np.int64(5), 5, True),
        (np.uint8(4), 5, False),
        (2, 1, True),
        (0, 1, False),
        (True, None, False),
        (np.bool_(True), None, False),
        (1.0, None, False),
        ("1", None, False),
        (None, 0, False),
    ],
)
def test_is_whole(value, minimum, expected):
    assert is_whole(value, minimum) is expected
