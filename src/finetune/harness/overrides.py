"""Hydra command-line overrides: read with Hydra's own parser, values quoted so that Hydra reads them back, and a
search's ``hydra.sweeper.params.<key>=`` given on the command line turned into the override Hydra takes."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, OverrideParseException

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


_PARAM_ON_COMMAND_LINE = re.compile(r"(?P<prefix>[+~]*)hydra\.sweeper\.params\.(?P<key>[^=]+)(?:=(?P<value>.*))?", re.S)


def sweep_params_from_argv(argv: list[str]) -> list[str]:
    """``argv`` with every ``hydra.sweeper.params.<key>=<value>`` as the override ``<key>=<value>``.

    Hydra cannot take such an override itself: in a multirun it refuses a sweep inside ``hydra.`` ("Sweeping over
    Hydra's configuration is not supported"), and a dotted key (``optimizer.lr``, one key of ``params``) is read as
    nested nodes that do not exist. The sweeper reads ``params`` and the command line's sweep overrides alike, the
    command line last, so ``<key>=<value>`` does what was asked: a sweep replaces the preset's for that key, a plain
    value fixes it. A value quoted so that Hydra reads it as a string (``'interval(0.001, 0.1)'``) is unquoted.
    """
    args = list(argv[1:])
    if not any(_PARAM_ON_COMMAND_LINE.fullmatch(arg) for arg in args):
        return list(argv)
    out = [argv[0]]
    for arg in args:
        match = _PARAM_ON_COMMAND_LINE.fullmatch(arg)
        if not match:
            out.append(arg)
            continue
        key, value = match["key"], match["value"]
        if "~" in match["prefix"] or value is None:
            raise SettingError(
                f"{arg}: to stop searching {key}, give it one value instead ({key}=VALUE on the command line "
                "fixes a key that the search's params would search)."
            )
        out.append(f"{key}={_unquoted(value)}")
    return out


def _unquoted(value: str) -> str:
    """``value`` without the quotes that would make Hydra read a sweep as a plain string."""
    stripped = value.strip()
    if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":
        try:
            parsed = OverridesParser.create().parse_override(f"key={stripped}").value()
        except Exception:  # noqa: BLE001 - not one quoted string: Hydra reads it as it is, and says what is wrong
            return value
        if isinstance(parsed, str):
            return parsed
    return value


def check_override_syntax(args: Sequence[str]) -> None:
    """Refuse the first command-line override that Hydra's grammar cannot read, naming it and showing it quoted.

    ``args`` is the command line after the program (flags such as ``-m`` or ``--cfg job`` are left to Hydra). Hydra
    reads ``'``, ``"``, ``#``, ``(``, ``[``, ``{``, ``=`` and the like in a value as its own syntax: such a value
    goes in double quotes for Hydra, and the whole override in quotes for the shell.
    """
    overrides = _overrides_in(args)
    multirun = any(arg in ("-m", "--multirun") for arg in args)
    parser = OverridesParser.create()
    for override in overrides:
        try:
            [parsed] = parser.parse_overrides([override])
        except OverrideParseException as err:
            if "=" not in override:
                raise SettingError(
                    f"Hydra cannot read the override {override!r}: an override is KEY=VALUE (e.g. "
                    "trainer.max_epochs=10), +KEY=VALUE to add a key, or ~KEY to remove one."
                ) from None
            raise SettingError(
                f"Hydra cannot read the override {override!r} ({_problem(override, err)}). A value holding a quote, "
                "#, =, brackets or parentheses goes in double quotes for Hydra's grammar, and the whole override "
                f"in quotes for the shell{_quoted_example(override)}."
            ) from None
        else:
            if parsed.is_sweep_override() and not multirun and not parsed.key_or_group.startswith("hydra.sweeper."):
                raise SettingError(  # Hydra's own: "Ambiguous value for argument", exit 1 and a stack-trace hint
                    f"{override}: Hydra reads this value as a sweep (a comma, range(), choice() or glob()), and this "
                    "is not a multirun. For one value holding a comma (a path, say), quote it"
                    f"{_quoted_example(override) or ''}; for a list, "
                    f"{parsed.key_or_group}=[...]; to sweep over the values, add -m."
                )
    _check_groups_added_once(overrides)


def _check_groups_added_once(overrides: Sequence[str]) -> None:
    """``+callbacks=lora +callbacks=ema``: Hydra takes one ``+GROUP=`` per command line and stops with "Multiple
    values for callbacks" (exit 1, a stack hint); say the list form instead."""
    added: dict[str, str] = {}
    for override in overrides:
        key, equals, value = override.partition("=")
        if not equals or not key.startswith("+") or key.startswith("++") or "." in key:
            continue  # only a config group (no dot) has this trap
        if key in added:
            values = [v.strip("[] ") for v in (added[key], value)]
            listed = ",".join(item for v in values for item in v.split(",") if item)
            raise SettingError(
                f"{key}={added[key]} and {override}: Hydra adds a config group once per command line. "
                f"Give both in one list: '{key}=[{listed}]'."
            )
        added[key] = value


def _overrides_in(args: Sequence[str]) -> list[str]:
    """The overrides of a command line, as Hydra's own argument parser separates them from its flags."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.exit_on_error = False
    try:
        known, _ = parser.parse_known_args(list(args))
    except (argparse.ArgumentError, SystemExit):
        return []  # a malformed flag: Hydra reports it itself
    return list(known.overrides or [])


def _problem(override: str, err: OverrideParseException) -> str:
    """Hydra's reason in a few words: the character it stopped at, or its parser's message."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("See https://", "Error parsing override"))]
    lexer = "LexerNoViableAltException: "
    if len(lines) >= 2 and lines[0].startswith(lexer) and "^" in lines[1]:
        column = lines[1].index("^") - len(lexer)
        if 0 <= column < len(override):
            return f"it stops at {override[column]!r} after {override[:column]!r}"
    return lines[0] if lines else "a syntax error"


def _quoted_example(override: str) -> str:
    """``: "key=\\"value\\""`` (as typed in a POSIX shell) where that quoting reads back as the value given, else
    ``""``."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        return ""
    for quote_char in ('"', "'"):
        if quote_char in value:
            continue
        quoted = f"{key}={quote_char}{value}{quote_char}"
        try:
            [parsed] = OverridesParser.create().parse_overrides([quoted])
        except HydraException:
            continue
        if parsed.value() == value:
            return f": {_shell_word(quoted)}"
    return ""


def _shell_word(text: str) -> str:
    """``text`` as one word for a POSIX shell: in single quotes, or in double quotes where it holds a single quote."""
    if "'" not in text:
        return f"'{text}'"
    return '"' + re.sub(r'(["\\$`])', r"\\\1", text) + '"'
