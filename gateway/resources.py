"""Where the templates and policies that ship with Listgate are found."""

from __future__ import annotations

import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent
_INSTALLED = Path(sys.prefix) / "share" / "listgate"


def _shipped(name: str) -> Path:
    """A source checkout (and an editable install) reads the repository's folder;
    a wheel install reads the copy under ``<prefix>/share/listgate``."""
    here = _CHECKOUT / name
    return here if here.is_dir() else _INSTALLED / name


def templates_dir() -> Path:
    return _shipped("templates")


def policies_dir() -> Path:
    return _shipped("policies")
