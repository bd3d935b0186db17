"""The one exception every HyperForget library function raises for bad input.

The CLI turns it into a one-line message and a non-zero exit code; library users
catch it to tell user errors apart from bugs.
"""


class HyperForgetError(Exception):
    """Bad input or a broken artifact, with a message that names the problem and the fix."""
