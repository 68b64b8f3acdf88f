"""`python cli.py ...` from a checkout: the same program as the installed `cnncodes` command.

The typer app lives in pipeline/cli.py, so that an installed cnncodes puts one package, `pipeline`, on the path
(no top-level `cli` module for another distribution's to shadow).
"""

from pipeline.cli import app

if __name__ == "__main__":
    app()
