"""User-facing errors.

Every problem a user can fix (bad input, missing file, unsupported model) is raised as a
`PizooError` whose message is one line naming the file or field and the fix. The CLI prints it
without a traceback and exits with `exit_code`.
"""


class PizooError(Exception):
    """A problem with the user's input; the message is one line that names the file/field and the fix."""

    exit_code = 2


class GateFailed(PizooError):
    """The evaluation gate rejected a model (distinct exit code so scripts can tell it from bad input)."""

    exit_code = 3


class Interrupted(PizooError):
    """A long run was interrupted (Ctrl-C) after saving its state; rerun with --resume to continue."""

    exit_code = 130
