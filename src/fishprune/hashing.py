"""One hashing scheme for every identity fishprune derives: run ids, cache keys, directory names."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(obj: Any) -> str:
    """``obj`` as compact JSON with sorted keys (non-JSON values via ``str``)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(obj: Any, length: int = 16) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``obj``: a string is hashed as its
    UTF-8 text, anything else as its :func:`canonical_json`."""
    text = obj if isinstance(obj, str) else canonical_json(obj)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
