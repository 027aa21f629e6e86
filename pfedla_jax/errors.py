"""User-facing errors.

Anything a user can cause with a flag, a missing file or an infeasible request raises
`UserInputError`; the CLI turns it into one line on stderr and a non-zero exit code.
"""


class UserInputError(ValueError):
    """Bad input from the user (flags, files, infeasible partitions). Message is one line."""


def check_choice(flag: str, value, choices) -> None:
    """Raises UserInputError('unknown --FLAG VALUE; expected one of A, B') unless value in choices."""
    if value not in choices:
        raise UserInputError(f"unknown --{flag} {value!r}; expected one of {', '.join(choices)}")
