"""The command line, `implicit-icl`: app.py declares the commands (typer); patch.py runs `patch` and
`generate`; the studies run the others."""

from implicit_icl.cli.app import app

__all__ = ["app"]
