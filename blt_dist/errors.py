"""Errors a user can fix. The CLI prints them as one line and exits non-zero."""
from __future__ import annotations


class UserError(Exception):
    """Bad input: a missing file, a corrupt shard, an invalid argument. Exit status 1."""

    exit_code = 1


class ConfigError(UserError, ValueError):
    """A config the system cannot run. `str(err)` is one line: '<key path>: <problem>'. Exit 2."""

    exit_code = 2

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config error: {key}: {message}" if key else f"config error: {message}")
