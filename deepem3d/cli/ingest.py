"""Placeholder: being written; replaced by the real command."""

import click


@click.command()
def ingest() -> None:
    """(not yet available)"""
    raise click.ClickException("ingest is not available yet")
