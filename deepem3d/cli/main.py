"""The `deepem3d` entry point around the command group (`deepem3d.cli.commands`).

Expected mistakes (InputError, click usage errors, a path that runs through a file where a
folder is needed, a path the user may not read or write, a CloudFiles secret file that is not
one) print one line and exit with status
2 (75 where a bucket or queue service did not answer: trying again may work); anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import click

from deepem3d.errors import EXIT_UNAVAILABLE, InputError, ServiceUnavailable


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors with exit status 2 for expected mistakes (75 for
    a service that did not answer)."""
    from deepem3d.storage.cloud import prepare_environment, unreadable_secret

    prepare_environment()
    try:  # the commands import CloudVolume, and CloudFiles reads a secret file when imported
        from deepem3d.cli.commands import cli
    except Exception as err:
        message = unreadable_secret(err)
        if message is None:
            raise
        click.echo(f"deepem3d: error: {message}", err=True)
        sys.exit(2)
    try:
        rv = cli.main(args=argv, prog_name="deepem3d", standalone_mode=False)
    except InputError as err:
        click.echo(f"deepem3d: error: {err}", err=True)
        sys.exit(EXIT_UNAVAILABLE if isinstance(err, ServiceUnavailable) else 2)
    except (NotADirectoryError, FileExistsError) as err:
        if not _file_in_the_way(err):
            raise
        from deepem3d.sources import file_in_the_way

        click.echo(f"deepem3d: error: {file_in_the_way(err.filename)}", err=True)
        sys.exit(2)
    except PermissionError as err:
        if not err.filename:
            raise
        click.echo(f"deepem3d: error: {err.filename}: permission denied", err=True)
        sys.exit(2)
    except click.UsageError as err:
        click.echo(f"deepem3d: error: {err.format_message()}", err=True)
        sys.exit(2)
    except click.ClickException as err:
        click.echo(f"deepem3d: error: {err.format_message()}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)


def _file_in_the_way(err: OSError) -> bool:
    """Whether an OS error is a user's path naming a file where a folder goes (a layer given as
    its info file, an output under a file), not a bug."""
    import os

    if isinstance(err, NotADirectoryError):
        return True
    return bool(err.filename) and os.path.isfile(err.filename)
