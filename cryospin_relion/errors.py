"""Errors that commands turn into exit codes without a traceback."""

from __future__ import annotations


class InputError(Exception):
    """Bad user input: a file or field that cannot be used. Exit code 2.

    The message is one line and names the file and the field (and row where
    it applies), e.g. ``particles.star: row 12: rlnImageName: stack
    'Extract/a.mrcs' not found``.
    """

    exit_code = 2


class InputErrors(InputError):
    """Several input problems reported at once (one line each)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
