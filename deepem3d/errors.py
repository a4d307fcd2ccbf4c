"""The one exception type for expected mistakes: the CLI turns it into a one-line error, exit 2
(its kind for a service that did not answer, 75);
the one spelling of a warning, a line on stderr that lets the command go on; and the write
errors (a full disk) reported the same way."""

import errno
import sys

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
