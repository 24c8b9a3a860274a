"""JSON from outside (manifests, artifact headers, fleet server bodies, MQTT messages), depth-bounded.

``json.loads`` recurses once per nesting level: 100k nested ``[`` (100 KB) raise RecursionError,
which is no ValueError and so escapes every "not valid JSON" check as an internal error, and a
document nested just under the interpreter's limit makes later recursive code (pydantic,
``json.dumps`` of a stored handle) fail instead. :func:`loads` counts the nesting first, in one
linear pass over the text with strings removed, and refuses anything deeper than ``max_depth``
with :class:`JSONTooDeep` - a ValueError, so the callers' existing "not valid JSON" handling
refuses it properly. No real manifest, header or server answer nests beyond a dozen levels.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 64

_STRING = re.compile(r'"(?:[^"\\]|\\.)*+"', re.S)  # possessive: linear, no backtracking
_BRACKET = re.compile(r"[\[\]{}]")


class JSONTooDeep(ValueError):
    """The document nests arrays/objects deeper than allowed."""


def check_depth(text: str, max_depth: int = MAX_DEPTH) -> None:
    depth = 0
    for m in _BRACKET.finditer(_STRING.sub("", text)):
        if m.group() in "[{":
            depth += 1
            if depth > max_depth:
                raise JSONTooDeep(f"JSON nested deeper than {max_depth} levels")
        else:
            depth -= 1


def loads(data: str | bytes | bytearray, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` of outside input: ValueError (never RecursionError) when unusable."""
    if isinstance(data, bytes | bytearray):
        data = data.decode(json.detect_encoding(data), "surrogatepass")  # as json.loads does
    check_depth(data, max_depth)
    try:
        return json.loads(data)
    except RecursionError:  # not reachable after the check; kept so it can never escape
        raise JSONTooDeep("JSON nested too deeply") from None
