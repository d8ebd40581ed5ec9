"""The one exception type for user errors: caught at the CLI, printed as one line, non-zero exit."""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, ...). The message names the thing and the fix."""


class TrainingDiverged(Exception):
    """Too many consecutive non-finite steps; the last good checkpoint is left in place."""
