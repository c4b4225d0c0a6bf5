"""Argument checks shared by the modules and the functional ops: each error names its argument."""
from __future__ import annotations

import operator


def check_int(value, name: str, minimum: int = 0) -> int:
    """``value`` as a Python int (ints, numpy ints and 0-d integer tensors are accepted).

    Raises ``TypeError`` if it is not an integer and ``ValueError`` if it is below
    ``minimum``, both messages starting with ``name``.
    """
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def check_pair(value, name: str, minimum: int | None = None) -> tuple[int, int]:
    """``value`` (an int or a pair of ints) as a pair of Python ints.

    Raises ``ValueError`` naming ``name`` if it is neither, or (with ``minimum``)
    if either entry is below ``minimum``.
    """
    try:
        pair = (operator.index(value),) * 2
    except TypeError:
        try:
            pair = tuple(operator.index(v) for v in value)
        except TypeError:
            pair = ()
        if len(pair) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if minimum is not None and min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {pair}")
    return pair
