"""The one exception type for mistakes a user can make and fix."""


class UserError(Exception):
    """Bad input a user can correct: the CLI prints the message as one line and exits with status 2."""


def one_line(error: UserError) -> str:
    """The message of a user error as one line.

    An error raised in a DataLoader worker reaches the main process re-raised with the worker's
    traceback as its message; the user's message is the traceback's last line.
    """
    last = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return last.removeprefix(f"{UserError.__module__}.{UserError.__qualname__}: ")
