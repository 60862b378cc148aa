"""The error for a setting an engine cannot use (imports nothing, so the model package may raise it too)."""

from __future__ import annotations

from collections.abc import Mapping


class SettingError(Exception):
    """A setting an engine cannot use. The message writes each setting it names as ``{name}`` (listed in
    ``settings``): ``str()`` shows the setting's own name, the command line (``render``) shows its flag."""

    def __init__(self, message: str, *settings: str):
        self.template = message
        self.settings = settings
        super().__init__(self.render({}))

    def render(self, names: Mapping[str, str]) -> str:
        out = self.template
        for s in self.settings:
            out = out.replace("{" + s + "}", names.get(s, s))
        return out
