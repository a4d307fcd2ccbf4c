"""Placeholder: being written; replaced by the real command."""

import click


@click.command()
def downsample() -> None:
    """(not yet available)"""
    raise click.ClickException("downsample is not available yet")
