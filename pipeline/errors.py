"""The one exception the job shows its users as a plain message, without a traceback."""


class UsageError(ValueError):
    """A mistake in what the job was asked to do (a path, a setting, an OUT it must not touch):
    the message says what is wrong, with which value, and what to do instead."""
