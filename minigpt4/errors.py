"""Exceptions with messages meant for people: the app and the server show them as they are."""


class InputError(ValueError):
    """Something a user sent cannot be used; the message says what and is safe to show."""


class ImageError(InputError):
    """An image is unreadable, empty, truncated or too large."""


class MessageError(InputError):
    """A message is empty or longer than the context can hold."""


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names the key (and the file)."""
