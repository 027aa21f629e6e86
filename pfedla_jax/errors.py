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


class RunInterrupted(Exception):
    """A run stopped by SIGINT or SIGTERM (experiments.run exits with 128 + signum).

    Attributes:
      signum: the signal.
      round_done: rounds complete when the run stopped (the checkpoint's round when one was
        saved there).
      rounds: the run's --rounds.
      checkpoint_round: the round of the newest checkpoint in the workdir (None: no workdir
        or no checkpoint yet).
      finished_round: True if the run stopped between rounds (the current round finished and
        was checkpointed); False if a second signal abandoned the round in progress.
    """

    def __init__(self, signum: int, round_done: int, rounds: int, checkpoint_round: int | None,
                 finished_round: bool):
        self.signum, self.round_done, self.rounds = signum, round_done, rounds
        self.checkpoint_round, self.finished_round = checkpoint_round, finished_round
        super().__init__(f"stopped by signal {signum} after round {round_done} of {rounds}")
