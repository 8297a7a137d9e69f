"""The one exception type for problems a user can cause or fix."""


class FlashMoeError(Exception):
    """A user-facing error: the message says what is wrong and what to do.

    Raised for bad paths, truncated or mismatched files, unsupported configs
    and invalid options. Never raised for programming errors.
    """
