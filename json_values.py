"""Values made ready for strict JSON, for every stage that writes results: NamedTuples as objects,
numpy and torch numbers and arrays as Python numbers and lists, NaN and infinities as null (Python's
json module would write NaN, which other readers refuse). Shared by eval's report, reproduce's
results and selftest's output."""

from __future__ import annotations

import math
from typing import Any


def jsonable(x: Any) -> Any:
    """x with every NamedTuple, array and non-finite float replaced (see the module docstring)."""
    if hasattr(x, "_asdict"):
        return jsonable(x._asdict())
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if hasattr(x, "tolist"):  # numpy / torch scalars and arrays
        return jsonable(x.tolist())
    return x
