"""Errors that are the user's to fix: the CLI prints their message on one line, without a traceback."""


class UserError(Exception):
    """A mistake in what the user asked for (bad config, unknown env id, corrupt file ...).

    The message says what is wrong and what to do; ``tlb-rl`` prints it and exits with status 2.
    """


class TrainingError(RuntimeError):
    """Training cannot go on (a loss became NaN or inf); the last checkpoint is the last good state."""
