"""`python -m pipeline ...`: the cnncodes command."""

from .cli import app

app(prog_name="cnncodes")
