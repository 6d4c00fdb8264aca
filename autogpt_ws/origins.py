"""Origin lists: exact entries, or ``regex:<pattern>`` matched whole."""

from __future__ import annotations

import re
from typing import Iterable


class OriginList:
    def __init__(self, entries: Iterable[str]) -> None:
        self.exact: frozenset[str] = frozenset(e for e in entries if not e.startswith("regex:"))
        self.patterns = tuple(re.compile(e[6:]) for e in entries if e.startswith("regex:"))

    def __bool__(self) -> bool:
        return bool(self.exact or self.patterns)

    def allows(self, origin: str) -> bool:
        return origin in self.exact or any(p.fullmatch(origin) for p in self.patterns)
