"""One exception type for every problem the user can fix.

The CLI prints a `MedtuneError` as a short paragraph (no traceback) and exits with status 2;
anything else is a bug in medtune and keeps its traceback.
"""


class MedtuneError(Exception):
    """A problem with the user's input, named, with what to do about it."""


class DataError(MedtuneError):
    """Unreadable, inconsistent or too-small data."""


class ConfigError(MedtuneError):
    """A bad key or value in the experiment file or a --set override."""


class BackboneError(MedtuneError):
    """An unknown backbone name or weights that cannot be had."""


class TrainingError(MedtuneError):
    """A cell that cannot train (NaN loss, out of memory); recorded, the grid goes on."""


class DataWarning(UserWarning):
    """A data problem medtune works around (a repeated manifest row, a blank image, a skipped link):
    the data stays usable, so it is said, not raised; `data check` lists these as warnings."""


class StoreError(MedtuneError):
    """The results store cannot be read or written (read-only, locked, full disk, damaged)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run, carrying its RunSummary so far: the CLI says what is kept and how to resume."""

    def __init__(self, summary) -> None:
        super().__init__()
        self.summary = summary
