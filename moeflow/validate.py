"""The checks every config dataclass runs at construction, and the field declaration its CLI reads.

Each check raises `ValueError(f"{name}={value!r}: {need}")`, so every config in moeflow (model,
router, run, parallel layout, serving, engine, sampling, load test) reports a bad value the same
way: the field, the value and what it must be. Booleans are refused where numbers are expected
(`True` is an int to Python, never a batch size to a user), and numbers must be finite.

`option(help, ...)` declares a dataclass field with the metadata `moeflow.cli.add_dataclass_flags`
turns into a flag (help text, an optional flag name and choices), so a config's fields are the
one list of its command-line options.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, NoReturn


def fail(name: str, value: Any, need: str) -> NoReturn:
    raise ValueError(f"{name}={value!r}: {need}")


def check(ok: bool, name: str, value: Any, need: str) -> None:
    if not ok:
        fail(name, value, need)


def integer(name: str, value: Any, lo: int | None = None, hi: int | None = None,
            optional: bool = False) -> None:
    """An int (not a bool) in [lo, hi]; None passes when `optional`."""
    if optional and value is None:
        return
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        fail(name, value, _need("an integer", _bounds(lo, hi, False, False)))


def number(name: str, value: Any, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False, optional: bool = False) -> None:
    """A finite int or float (not a bool) in the interval; *_open excludes that end."""
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        fail(name, value, _need("a finite number", _bounds(lo, hi, lo_open, hi_open)))


def choice(name: str, value: Any, choices: tuple, optional: bool = False) -> None:
    if optional and value is None:
        return
    if value not in choices:
        fail(name, value, f"must be one of {', '.join(map(str, choices))}")


def _need(what: str, bounds: str) -> str:
    return f"must be {what} {bounds}" if bounds else f"must be {what}"


def _bounds(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if hi is None:
        return f"> {lo}" if lo_open else f">= {lo}" if lo is not None else ""
    if lo is None:
        return f"< {hi}" if hi_open else f"<= {hi}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def option(help: str, *, flag: str | None = None, choices: tuple | None = None,
           metavar: str | None = None, **field_kw: Any) -> Any:
    """A dataclass field carrying its command-line help (and flag name, choices, metavar)."""
    meta: dict[str, Any] = {"help": help}
    if flag:
        meta["flag"] = flag
    if metavar:
        meta["metavar"] = metavar
    if choices:
        meta["choices"] = choices
    return dataclasses.field(metadata=meta, **field_kw)


def check_new_file(path: str | Path, flag: str = "--out") -> None:
    """A file a command will create: refused (ValueError naming `flag`) if something is there
    already or its directory does not exist, before the command does its work."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a directory; name a new file")
    if path.exists():
        raise ValueError(f"{flag} {str(path)!r} already exists; choose another {flag}")
    if not path.parent.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: directory {str(path.parent)!r} does not exist")
