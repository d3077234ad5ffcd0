"""``python -m aiolayercache``: the same as the ``aiolayercache`` command."""

from .cli import run

run()
