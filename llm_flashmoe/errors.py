"""The one exception type for problems a user can cause or fix, and the check of the on/off
switches a user sets in the environment."""

import os


class FlashMoeError(Exception):
    """A user-facing error: the message says what is wrong and what to do.

    Raised for bad paths, truncated or mismatched files, unsupported configs
    and invalid options. Never raised for programming errors.
    """


def env_switch(name: str) -> bool | None:
    """An `auto | 1 | 0` environment switch -> None for auto (also unset or empty), else True or
    False; any other value is refused, naming the variable."""
    want = os.environ.get(name, "auto").strip().lower() or "auto"
    if want == "auto":
        return None
    if want in ("1", "on", "yes", "true"):
        return True
    if want in ("0", "off", "no", "false"):
        return False
    raise FlashMoeError(f"{name}={want!r}: use auto, 1 or 0.")
