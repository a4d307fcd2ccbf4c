"""Placeholder: being written; replaced by the real command."""

import click


@click.command()
def evaluate() -> None:
    """(not yet available)"""
    raise click.ClickException("evaluate is not available yet")
