"""The one kind of error that means "what you asked for cannot be done as asked", as opposed to a bug.

Entry points end a :class:`UserError` with its message on stderr and exit code 2 (no traceback); every other
exception keeps its traceback. Raise a subclass where the fix is the user's: a setting, a file, a folder, a resume.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in a setting, a file or a folder the user gave: the message says what was wrong and what to do."""


class SettingError(UserError, ValueError):
    """A config setting with a value that cannot work; the message names the setting (``data.batch_size``)."""


class PathError(UserError, FileNotFoundError):
    """A path the user gave that is missing, or of the wrong kind (a file where a folder is needed, or the reverse)."""
