"""The one exception type users see for bad input."""


class SageKVError(ValueError):
    """Bad input or an unsupported setup; the message is one line meant for the user."""
