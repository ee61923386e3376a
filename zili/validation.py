"""Parameter checks shared by the validated configs (SamplingParams, QuantScheme / QuantizeOptions,
TrainConfig): each failure raises InvalidRequestError naming the parameter, with the caller's text."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from zili.errors import InvalidRequestError


def require(ok: bool, param: str, message: str) -> None:
    """Raise InvalidRequestError(message, param=param) unless `ok`."""
    if not ok:
        raise InvalidRequestError(message, param=param)


def require_each(obj: Any, names: Iterable[str], ok: Callable[[Any], bool], message: str) -> None:
    """`require(ok(value), name, message)` for each attribute `name` of `obj`; `message` may use
    {name} and {value}."""
    for name in names:
        value = getattr(obj, name)
        require(ok(value), name, message.format(name=name, value=value))


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is neither infinite nor NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
