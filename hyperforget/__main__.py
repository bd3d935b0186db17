"""``python -m hyperforget ...`` is the ``hyperforget`` command (also under torchrun)."""

from hyperforget.pipelines.cli import main

if __name__ == "__main__":
    main()
