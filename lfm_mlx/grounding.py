"""Where each extracted string came from: character spans in the source text, so a UI can highlight them.

A model copies values with small changes (a capital letter, a line break turned into a space), so a
value not found verbatim is looked for again case- and whitespace-insensitively. A whole-word match
wins over one inside a longer word ("Ann" should not point into "Annual").
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Optional

Span = tuple[int, int]
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def json_path(parent: str, key: str | int) -> str:
    """`$.items[0].name`; keys that are not identifiers in bracket form: `$['first name']`."""
    if isinstance(key, int):
        return f"{parent}[{key}]"
    if _IDENTIFIER.match(key):
        return f"{parent}.{key}"
    return f"{parent}[{key!r}]"


def string_leaves(data: Any, path: str = "$") -> Iterator[tuple[str, str]]:
    """(JSON path, value) of every string in `data`, in document order."""
    if isinstance(data, str):
        yield path, data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from string_leaves(value, json_path(path, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from string_leaves(value, json_path(path, i))


def _normalize(s: str) -> tuple[str, list[int]]:
    """Casefolded `s` with whitespace runs collapsed to one space (leading ones dropped), and for
    each output character the index of the input character it came from."""
    out: list[str] = []
    index: list[int] = []
    space = True
    for i, ch in enumerate(s):
        if ch.isspace():
            if not space:
                out.append(" ")
                index.append(i)
            space = True
        else:
            folded = ch.casefold()  # may be longer than one character ("ß" → "ss")
            out.extend(folded)
            index.extend([i] * len(folded))
            space = False
    return "".join(out), index


def _occurrences(haystack: str, needle: str) -> Iterator[int]:
    i = haystack.find(needle)
    while i >= 0:
        yield i
        i = haystack.find(needle, i + 1)


def _best(haystack: str, needle: str) -> Optional[int]:
    """The first whole-word occurrence of `needle`, else the first occurrence at all."""
    first = None
    for i in _occurrences(haystack, needle):
        j = i + len(needle)
        before = haystack[i - 1] if i else " "
        after = haystack[j] if j < len(haystack) else " "
        if not (before.isalnum() and needle[0].isalnum()) and not (after.isalnum() and needle[-1].isalnum()):
            return i
        first = i if first is None else first
    return first


class Grounder:
    """Finds values in one source text; the normalized copy of the text is built once."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._normal: Optional[tuple[str, list[int]]] = None

    def find(self, value: str) -> Optional[Span]:
        """The span of `value` in the text: exact first, then case- and whitespace-insensitive."""
        stripped = value.strip()
        if not stripped:
            return None
        i = _best(self.text, stripped)
        if i is not None:
            return i, i + len(stripped)
        if self._normal is None:
            self._normal = _normalize(self.text)
        normal, index = self._normal
        needle = _normalize(stripped)[0]
        i = _best(normal, needle)
        if i is None:
            return None
        return index[i], index[i + len(needle) - 1] + 1


def ground(data: Any, text: str) -> dict[str, Optional[Span]]:
    """For each string leaf of `data`, by JSON path, its `(start, end)` span in `text` or None."""
    grounder = Grounder(text)
    return {path: grounder.find(value) for path, value in string_leaves(data)}
