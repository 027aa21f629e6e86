"""User-facing errors.

Anything a user can cause with a flag, a missing file or an infeasible request raises
`UserInputError`; the CLI turns it into one line on stderr and a non-zero exit code.
"""


class UserInputError(ValueError):
    """Bad input from the user (flags, files, infeasible partitions). Message is one line."""
