"""``python -m infrec`` = the ``infrec`` command."""

from infrec.cli import app

app(prog_name="infrec")
