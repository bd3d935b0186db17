"""``python -m hyperforget.pipelines ...`` is the ``hyperforget`` command (``python -m hyperforget`` too)."""

from hyperforget.pipelines.cli import main

main()
