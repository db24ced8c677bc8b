"""YAML for configs: ``yaml.safe_load`` with a bound on aliases.

A config file is user input. ``safe_load`` constructs no objects, but anchors and aliases still let a
few hundred bytes stand for billions of nodes ("billion laughs"): the parse is cheap (aliases share
one object), every later copy, dump or walk of the data is not. Configs have no need for more than a
handful of aliases, so more than ``MAX_ALIASES`` is refused as a parse error.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_ALIASES = 64
"""The most aliases (``*name``) one config document may use."""


class TooManyAliasesError(yaml.YAMLError):
    """A YAML document uses more than ``MAX_ALIASES`` aliases."""


class _BoundedLoader(yaml.SafeLoader):
    def __init__(self, stream):
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise TooManyAliasesError(
                    f"more than {MAX_ALIASES} aliases (*name): refused, as a config never needs that many and "
                    f"aliases of aliases expand exponentially; write the values out"
                )
        return super().compose_node(parent, index)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)`` with at most ``MAX_ALIASES`` aliases (else :class:`TooManyAliasesError`,
    a ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506  (a SafeLoader subclass)
