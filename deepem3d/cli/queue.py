"""Placeholder: being written."""

import click


@click.command()
def worker() -> None:
    """(not yet available)"""


@click.command()
def status() -> None:
    """(not yet available)"""
