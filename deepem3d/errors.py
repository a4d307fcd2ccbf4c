"""The one exception type for expected mistakes: the CLI turns it into a one-line error, exit 2
(its kind for a service that did not answer, 75);
the one spelling of a warning, a line on stderr that lets the command go on; and the write
errors (a full disk) reported the same way, by `write_errors_reported`."""

import contextlib
import errno
import os
import shutil
import sys
from collections.abc import Iterator

from deepem3d.units import format_bytes

#: what writing a file can meet that is no bug: a full disk, a file system's size limit or
#: quota, a read-only mount, an offset past what it holds (numpy's memmap: EINVAL)
WRITE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EINVAL)


class InputError(ValueError):
    """Bad input from the user: a message naming the problem and, where possible, the fix."""


#: the exit status of a command a cloud service did not answer: sysexits' EX_TEMPFAIL, so
#: that a supervisor (the driver Job, which gives up on 2) starts it again
EXIT_UNAVAILABLE = 75


class ServiceUnavailable(InputError):
    """A bucket or queue service that did not answer (a refused or timed-out connection,
    throttling, a server error): the same one-line error, exit status EXIT_UNAVAILABLE, since
    the same command may well work a minute later."""


def warn(message: str) -> None:
    """`deepem3d: warning: MESSAGE` on stderr (stdout stays for what a command reports)."""
    print(f"deepem3d: warning: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def write_errors_reported(path: str | os.PathLike, *,
                          also: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Within it, a write that meets WRITE_ERRNOS (or an exception of a type in ALSO: torch's
    writer raises a RuntimeError) is `cannot write PATH: WHY (N free in FOLDER)`, one line;
    any other error passes unchanged (a read's: a network error is an OSError too)."""
    try:
        yield
    except (OSError, *also) as err:
        if isinstance(err, OSError) and err.errno not in WRITE_ERRNOS:
            raise
        why = err.strerror if isinstance(err, OSError) else str(err).splitlines()[0]
        folder = os.path.dirname(os.path.abspath(path))
        while not os.path.isdir(folder):
            folder = os.path.dirname(folder)
        free = shutil.disk_usage(folder).free
        raise InputError(f"cannot write {path}: {why} "
                         f"({format_bytes(free) if free else '0 B'} free in {folder})") from None
