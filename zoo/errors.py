"""The one exception every HyperForget library function raises for bad input.

The CLI turns it into a one-line message and a non-zero exit code; library users
catch it to tell user errors apart from bugs.
"""


class HyperForgetError(Exception):
    """Bad input or a broken artifact, with a message that names the problem and the fix."""


def from_settings(cls, settings: dict, what: str):
    """``cls(**settings)`` for a config dataclass, refusing keys it does not know in one line.

    Settings come back from zoo.json and the CLI; a misspelled or stale key must name itself
    and the valid ones instead of surfacing as a TypeError.
    """
    from dataclasses import fields

    names = {f.name for f in fields(cls)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise HyperForgetError(f"unknown {what} settings {unknown}; known: {sorted(names)}")
    return cls(**settings)
