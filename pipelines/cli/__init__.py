"""The `hyperforget` command: a thin typer shell over library functions, grouped by stage.

Each stage module exposes ``register(app)``; library code raises HyperForgetError, which
``main`` turns into a one-line message and exit code 2.
"""

from __future__ import annotations

import errno
import importlib
import sys

import typer

from hyperforget.zoo.errors import HyperForgetError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="HyperForget: checkpoint zoos, diffusion hypernetworks and class unlearning.")

# Stage modules, upstream first. A module that is not there yet is skipped, not fatal.
STAGES = ["zoo_cmds", "collect_cmds", "query_cmds", "hyper_cmds", "quality_cmds", "unlearn_cmds", "evaluate_cmds",
          "baselines_cmds", "bench_cmds"]
for _stage in STAGES:
    try:
        _module = importlib.import_module(f"hyperforget.pipelines.cli.{_stage}")
    except ModuleNotFoundError as exc:
        if exc.name != f"hyperforget.pipelines.cli.{_stage}":
            raise
        continue
    _module.register(app)


def main() -> None:
    try:
        # standalone_mode=False makes click return a typer.Exit code instead of exiting.
        code = app(standalone_mode=False)
        if code == 130:  # typer turns KeyboardInterrupt into an exit code of 130
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except HyperForgetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        # Writers commit atomically, so what was written before stays and the command resumes.
        print(f"error: the disk is full ({exc.filename or exc.strerror}); free space and re-run the same command "
              "to resume", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("error: interrupted; re-run the same command to resume", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # click usage errors carry their own exit code
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
