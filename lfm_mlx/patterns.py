"""Shortest completions of JSON Schema `pattern`s.

The closing planner's way out of a string whose pattern the model has not satisfied yet (say
`wpc-[0-9]+` after "x7", or `(.+/)?.+:.+` after "ab"): no ranking of single tokens finds these, a
search does. A pattern is parsed with Python's regex parser (ECMA-262 patterns are mostly the same
language) into an NFA over character classes; a breadth-first search over sets of NFA states finds the
shortest text that, appended to the string so far, makes the pattern match. JSON Schema patterns are
not anchored: they match anywhere in the string unless they say `^` / `$`.
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache
from typing import Any, Iterator, Optional

try:
    from re import _constants as C, _parser as parser  # Python >= 3.11
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as C
    import sre_parse as parser

MAX_STATES = 20_000  # an NFA past this (e.g. `\d{1,5000}`) is not searched
MAX_VISITED = 5_000  # state sets the search may visit before giving up
# Characters tried for a class, in order: plain ones need no escaping in JSON and tokenize well.
PREFERRED = "a0A_-.:/@ " + "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"\\') + "é"
LINE_BREAKS = "\n\r\u2028\u2029"
EVERYTHING = ("everything", None)  # what an unanchored pattern lets stand before and after its match

_CATEGORIES = {
    C.CATEGORY_DIGIT: lambda ch: "0" <= ch <= "9",
    C.CATEGORY_NOT_DIGIT: lambda ch: not "0" <= ch <= "9",
    C.CATEGORY_WORD: lambda ch: ch.isascii() and (ch.isalnum() or ch == "_"),
    C.CATEGORY_NOT_WORD: lambda ch: not (ch.isascii() and (ch.isalnum() or ch == "_")),
    C.CATEGORY_SPACE: str.isspace,
    C.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
}


class _TooBig(Exception):
    pass


def _frozen(value: Any) -> Any:
    """The parser's nested lists as tuples, so a character class can key a cache."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _matches(test: tuple, ch: str) -> bool:
    op, arg = test
    if op is EVERYTHING[0]:
        return True
    if op is C.LITERAL:
        return ord(ch) == arg
    if op is C.NOT_LITERAL:
        return ord(ch) != arg
    if op is C.ANY:
        return ch not in LINE_BREAKS
    negate, hit = False, False
    for item_op, item in arg:  # C.IN
        if item_op is C.NEGATE:
            negate = True
        elif item_op is C.LITERAL:
            hit = hit or ord(ch) == item
        elif item_op is C.RANGE:
            hit = hit or item[0] <= ord(ch) <= item[1]
        elif item_op is C.CATEGORY:
            hit = hit or _CATEGORIES.get(item, lambda _: False)(ch)
    return hit != negate


@lru_cache(maxsize=4096)
def _example(test: tuple) -> Optional[str]:
    """One character the class admits, the plainest first."""
    if test[0] is C.LITERAL:
        return chr(test[1])
    return next((ch for ch in PREFERRED if _matches(test, ch)), None)


class Pattern:
    """A pattern as an NFA: `moves[s]` holds (class, target) character steps, `jumps[s]` holds
    (target, condition) empty steps, the condition being None, "begin" or "end" (`^` / `$`)."""

    def __init__(self, regex: str) -> None:
        self.moves: list[list[tuple[tuple, int]]] = []
        self.jumps: list[list[tuple[int, Optional[str]]]] = []
        self.start = self._state()
        self.moves[self.start].append((EVERYTHING, self.start))
        body = self._state()
        self.jumps[self.start].append((body, None))
        self.final = self._sequence(parser.parse(regex), body)
        self.moves[self.final].append((EVERYTHING, self.final))

    def _state(self) -> int:
        if len(self.moves) >= MAX_STATES:
            raise _TooBig
        self.moves.append([])
        self.jumps.append([])
        return len(self.moves) - 1

    def _sequence(self, items: Any, state: int) -> int:
        for op, arg in items:
            state = self._item(op, arg, state)
        return state

    def _item(self, op: Any, arg: Any, state: int) -> int:
        if op in (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN):
            end = self._state()
            self.moves[state].append(((op, _frozen(arg)), end))
            return end
        if op is C.SUBPATTERN:
            return self._sequence(arg[-1], state)
        if op is C.ATOMIC_GROUP:
            return self._sequence(arg, state)
        if op is C.BRANCH:
            end = self._state()
            for alternative in arg[1]:
                begin = self._state()
                self.jumps[state].append((begin, None))
                self.jumps[self._sequence(alternative, begin)].append((end, None))
            return end
        if op in (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT):
            low, high, body = arg
            for _ in range(low):
                state = self._sequence(body, state)
            end = self._state()
            if high is C.MAXREPEAT:  # a fresh node to loop back to: `state` may have other ways out
                loop = self._state()
                self.jumps[state].append((loop, None))
                self.jumps[self._sequence(body, loop)].append((loop, None))
                self.jumps[loop].append((end, None))
                return end
            for _ in range(high - low):
                optional = self._state()
                self.jumps[state].append((optional, None))
                self.jumps[optional].append((end, None))
                state = self._sequence(body, optional)
            self.jumps[state].append((end, None))
            return end
        if op is C.AT:
            end = self._state()
            condition = {C.AT_BEGINNING: "begin", C.AT_BEGINNING_STRING: "begin",
                         C.AT_END: "end", C.AT_END_STRING: "end"}.get(arg)  # \b and \B: not tracked
            self.jumps[state].append((end, condition))
            return end
        raise _TooBig  # back-references and look-arounds: not searched

    def _closure(self, states: Iterator[int], *, at_start: bool, at_end: bool = False) -> frozenset[int]:
        seen = set(states)
        todo = list(seen)
        while todo:
            for target, condition in self.jumps[todo.pop()]:
                passable = condition is None or (condition == "begin" and at_start) or (condition == "end" and at_end)
                if passable and target not in seen:
                    seen.add(target)
                    todo.append(target)
        return frozenset(seen)

    def _step(self, states: frozenset[int], ch: str) -> frozenset[int]:
        return self._closure((t for s in states for test, t in self.moves[s] if _matches(test, ch)), at_start=False)

    def _accepts(self, states: frozenset[int], at_start: bool) -> bool:
        return self.final in self._closure(iter(states), at_start=at_start, at_end=True)

    def completion(self, text: str) -> Optional[str]:
        """The shortest text that, after `text`, makes the pattern match (None if none is found)."""
        states = self._closure(iter([self.start]), at_start=True)
        for ch in text:
            states = self._step(states, ch)
            if not states:
                return None
        queue, seen = deque([(states, "")]), {states}
        while queue and len(seen) < MAX_VISITED:
            states, suffix = queue.popleft()
            if self._accepts(states, at_start=not text and not suffix):
                return suffix
            tried = set()
            for s in states:
                for test, _ in self.moves[s]:
                    ch = _example(test)
                    if ch is None or ch in tried:
                        continue
                    tried.add(ch)
                    after = self._step(states, ch)
                    if after and after not in seen:
                        seen.add(after)
                        queue.append((after, suffix + ch))
        return None


@lru_cache(maxsize=256)
def compile_pattern(regex: str) -> Optional[Pattern]:
    """The pattern's NFA, or None when it cannot be searched (a syntax Python does not read, look-arounds,
    back-references, or too many states)."""
    try:
        return Pattern(regex)
    except (_TooBig, parser.error, RecursionError, OverflowError, TypeError, ValueError):
        return None


def schema_patterns(node: Any) -> tuple[str, ...]:
    """Every string pattern in a schema: `pattern` values, `patternProperties` keys (key patterns)."""
    found: dict[str, None] = {}

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("pattern"), str):
                found[value["pattern"]] = None
            if isinstance(value.get("patternProperties"), dict):
                found.update(dict.fromkeys(k for k in value["patternProperties"] if isinstance(k, str)))
            for sub in value.values():
                walk(sub)
        elif isinstance(value, list):
            for sub in value:
                walk(sub)

    walk(node)
    return tuple(found)
