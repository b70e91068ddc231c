"""The one exception type that reaches the user as a single line.

Anything the user can fix (a config key, a data file, a row, a model folder) raises
`UserError`; the CLI prints its message on stderr and exits with code 2, without a
traceback. Every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line naming the key, file or row."""


class TrainingFailed(Exception):
    """Training stopped on a fault it cannot train through (non-finite values, a failed
    save): one line on stderr, exit code 3."""


EXIT_USER_ERROR = 2
EXIT_TRAINING_FAILED = 3  # non-finite values it could not skip, or a checkpoint it could not write
