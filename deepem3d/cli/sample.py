"""Placeholder: being written; replaced by the real command."""

import click


@click.command()
def sample() -> None:
    """(not yet available)"""
    raise click.ClickException("sample is not available yet")
