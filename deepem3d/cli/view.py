"""Placeholder: being written; replaced by the real command."""

import click


@click.command()
def view() -> None:
    """(not yet available)"""
    raise click.ClickException("view is not available yet")
