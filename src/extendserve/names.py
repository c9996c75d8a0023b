"""Class names: what a label may be. Names end up in JSON, HTML, logs and terminals, and a user
picks a class by its name, so each must be visible, one line, and unique in its model."""

from __future__ import annotations

import os
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

from .errors import ExtendserveError
from .files import FileReadError, read_regular_file

MAX_NAME_CHARS = 200
# Cc: control (NUL, newline, ESC), Cf: format (bidi overrides, zero-width), Cs/Co/Cn: surrogates,
# private use, unassigned, Zl/Zp: line and paragraph separators.
_REFUSED = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def escaped(text: str) -> str:
    """``text`` with control and invisible characters written as escapes (``\\x1b``, ``\\n``,
    ``\\u202e``): a name from a user's files, printed to a terminal or a log, can neither run an
    escape sequence (clear the screen, hide what follows) nor forge a line of its own."""
    if text.isprintable():
        return text
    return "".join(ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in _REFUSED else ch
                   for ch in text)


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a class name, or None."""
    if not isinstance(name, str) or not name.strip():
        return "is empty or blank"
    if name != name.strip():
        return "starts or ends with whitespace"
    if len(name) > MAX_NAME_CHARS:
        return f"is over {MAX_NAME_CHARS} characters"
    for ch in name:
        if unicodedata.category(ch) in _REFUSED:
            return f"holds the invisible or control character U+{ord(ch):04X} ({unicodedata.name(ch, 'unnamed')})"
    return None


def check_class_names(names: Sequence[str], where: str, taken: Iterable[str] = (), taken_by: str = "the base model") -> None:
    """Every name valid, no name twice in ``names``, none already in ``taken``: O(len) with sets.

    ``taken`` are the labels the new classes sit beside (the base's own labels may repeat among
    themselves: ImageNet has two 'crane' and two 'maillot' classes)."""
    bad = [(n, why) for n in names if (why := name_problem(n)) is not None]
    if bad:
        shown = "; ".join(f"{n!r} {why}" for n, why in bad[:5])
        raise ExtendserveError(f"{where}: {len(bad)} class name(s) cannot be used: {shown}. Rename them "
                               "(visible characters, one line, no leading or trailing spaces)")
    twice = sorted(n for n, c in Counter(names).items() if c > 1)
    if twice:
        raise ExtendserveError(f"{where}: class names {twice[:10]} appear more than once; class names must be unique")
    old = set(taken)
    clash = sorted(n for n in names if n in old)
    if clash:
        raise ExtendserveError(f"{where}: class names {clash[:10]} are already classes of {taken_by}; a user could "
                               "not tell the two apart. Rename them, for example 'tench (mine)'")


def read_names(path: str | os.PathLike[str], what: str = "class list") -> list[str]:
    """A file of names, one a line (blank lines skipped, spaces around a name dropped)."""
    try:
        lines = read_regular_file(path, 64 * 1024**2, what).decode("utf-8").splitlines()
    except (FileReadError, UnicodeDecodeError) as e:
        raise ExtendserveError(f"{path}: cannot read the {what} ({e})") from None
    return [ln.strip() for ln in lines if ln.strip()]
