"""The one exception type for user mistakes: the CLI prints its message and exits with code 2."""


class UserError(Exception):
    """A problem the user can fix (bad option, bad dataset, mismatched cache); never a bug."""


def install_hint(extra: str) -> str:
    """The command that installs one of the package's extras, as a user who installed it from PyPI types it."""
    return f"pip install 'cnncodes[{extra}]'"
