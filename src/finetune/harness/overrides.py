"""Hydra command-line overrides: read with Hydra's own parser, and values quoted so that Hydra reads them back."""

from __future__ import annotations

import re
from collections.abc import Iterable

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from finetune.errors import SettingError


def override_keys(overrides: Iterable[str]) -> set[str]:
    """The keys (or config groups) that ``overrides`` set: ``{"data.image_size", "experiment", ...}``."""
    return {override.key_or_group for override in OverridesParser.create().parse_overrides(list(overrides))}


def quote(text: str) -> str:
    """``text`` as one override value: quoted (and escaped) unless it is plain, since a comma would mean a sweep.

    Raises ``ValueError`` for text Hydra cannot take back unchanged (e.g. ``${...}``, read as an interpolation).
    """
    # In Hydra's quoted strings \' is a quote, and only backslashes just before a quote or the end are doubled.
    value = text if re.fullmatch(r"[\w./:~+@%-]+", text) else "'" + re.sub(r"(\\*)('|$)", _escape, text) + "'"
    try:
        same = OverridesParser.create().parse_override(f"key={value}").value() == text
    except HydraException:
        same = False
    if not same or "${" in text:
        raise SettingError(f"{text!r} cannot be passed to Hydra as one plain value")
    return value


def _escape(match: re.Match[str]) -> str:
    return match[1] * 2 + ("\\'" if match[2] else "")
