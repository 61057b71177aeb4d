"""What every moco command group shares: how an error is shown and the ``--force`` wording."""
from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

FORCE_HELP = "replace a {what} a previous moco run wrote (never files moco did not write)"


def fail(error: Exception) -> None:
    """Print ``error`` (no traceback, markup escaped) and exit with status 2."""
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
    raise typer.Exit(2)
