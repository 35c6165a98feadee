"""Listgate: a mailing-list gateway that keeps lists a place for discussion."""

__version__ = "0.1.0"
