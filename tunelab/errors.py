"""The one exception family a user can cause. The CLI prints it on one line and exits 2."""


class TunelabError(Exception):
    """A problem the user can fix: the message names the file, line, key or module and says how."""


class ConfigError(TunelabError):
    """A recipe (YAML or command-line override) is malformed or holds an unknown or invalid key."""


class DataError(TunelabError):
    """A data file is missing, empty or unreadable."""


class ModelError(TunelabError):
    """A model or tokenizer reference is not usable (not a local directory, wrong shapes, ...)."""


def warn(message: str) -> None:
    """Print a one-line `warning: ...` on stderr: something the user should know that does not stop the run."""
    import sys

    print(f"warning: {message}", file=sys.stderr, flush=True)
