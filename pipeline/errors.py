"""The one exception type for mistakes a user can make and fix, and the faults turned into one."""

import contextlib
import errno
import json
from collections.abc import Iterator
from pathlib import Path

# Errors of a full disk or an exhausted quota: the user frees space and runs the same command again.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class UserError(Exception):
    """Bad input a user can correct: the CLI prints the message as one line and exits with status 2."""


def preview(items: list, limit: int = 3) -> str:
    """The first `limit` items, for a message about all of them."""
    return ", ".join(str(item) for item in items[:limit]) + (", ..." if len(items) > limit else "")


def one_line(error: UserError) -> str:
    """The message of a user error as one line.

    An error raised in a DataLoader worker reaches the main process re-raised with the worker's
    traceback as its message; the user's message is the traceback's last line.
    """
    last = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return last.removeprefix(f"{UserError.__module__}.{UserError.__qualname__}: ")


def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of the file at `path`, which the user names `what` (e.g. "params file"), or the one-line
    error; UTF-8 whatever the locale, so a file reads the same on every machine."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise UserError(f"cannot read {what} {path}: {error.strerror or error}") from error
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise UserError(f"{what} {path} is not UTF-8 text (byte {data[error.start]:#04x} at line {line}): "
                        "save it as UTF-8") from error


def read_json(path: str | Path, what: str) -> object:
    """The JSON in the file at `path`, which the user names `what` (e.g. "captions file"), or the one-line error."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{what} {path} is not valid JSON: {error}") from error


def is_out_of_space(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS


@contextlib.contextmanager
def out_of_space_is_a_user_error(target: str, advice: str) -> Iterator[None]:
    """Turn a full disk while writing `target` into a user error; `advice` says what survived and how to go on."""
    try:
        yield
    except OSError as error:
        if not is_out_of_space(error):
            raise
        raise UserError(f"no space left on the device writing {target}: {advice}") from error
