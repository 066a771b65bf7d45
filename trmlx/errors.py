"""The one exception type for mistakes a user can fix (bad recipe, bad data, bad flag).

The CLI prints each problem on its own line to stderr and exits with code 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """One or more problems in user input, each a complete one-line message."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class TrainingInterrupted(Exception):
    """Ctrl-C during training, raised by a backend after it wrote a checkpoint; carries that checkpoint's path."""

    def __init__(self, checkpoint: str):
        super().__init__(checkpoint)
        self.checkpoint = checkpoint
