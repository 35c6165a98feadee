"""What a list is called and where its addresses are: what decoration and notices need."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ListIdentity:
    """What decoration needs to know about a list."""

    name: str
    domain: str
    display_name: str
    subject_prefix: str
    archive_url: str | None

    @property
    def post_address(self) -> str:
        return f"{self.name}@{self.domain}"

    def address(self, suffix: str) -> str:
        return f"{self.name}-{suffix}@{self.domain}"

    @property
    def list_id(self) -> str:
        """The RFC 2919 identifier: the list address with '@' replaced by '.'."""
        return f"{self.name}.{self.domain}"
