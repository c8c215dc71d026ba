"""Errors caused by user input.

Everything a user can get wrong (a config key, a missing file, a tokenizer directory that does not
load, an output directory that holds another run's data) raises a `UserError` subclass with a message
that names the file, the key and what was expected. The CLI turns these into exit code 2 and one
paragraph, without a traceback; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix by changing input; the message says how."""


class ConfigError(UserError):
    """A config file or override is invalid: the message names the file and the full key path."""


class DataError(UserError):
    """Input data (corpus, tokenizer, prepared store) is missing, empty or inconsistent."""


class OutputExistsError(UserError):
    """An output directory holds the result of a different configuration."""
