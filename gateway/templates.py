"""The Jinja2 environment for notices, footers and digests.

HTML templates are autoescaped, undefined variables are errors, and a list can
override any template by placing one of the same name under
``<templates>/lists/<list address>/``.
"""

from __future__ import annotations

from pathlib import Path

import jinja2


class Templates:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._envs: dict[str, jinja2.Environment] = {}

    def _env(self, list_address: str | None) -> jinja2.Environment:
        key = list_address or ""
        env = self._envs.get(key)
        if env is None:
            search = [str(self.root)]
            if list_address:
                search.insert(0, str(self.root / "lists" / list_address))
            env = jinja2.Environment(
                loader=jinja2.FileSystemLoader(search),
                autoescape=jinja2.select_autoescape(["html", "htm", "xml", "html.j2"],
                                                    default_for_string=False),
                undefined=jinja2.StrictUndefined,
                keep_trailing_newline=True,
                trim_blocks=True,
                lstrip_blocks=True,
            )
            self._envs[key] = env
        return env

    def render(self, name: str, *, list_address: str | None = None, **context: object) -> str:
        return self._env(list_address).get_template(name).render(**context)
