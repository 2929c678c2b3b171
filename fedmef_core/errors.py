"""User-facing errors: their message names the problem and the fix, so no traceback is shown."""


class UserError(Exception):
    """A mistake or missing piece the user can fix (config, dataset, partition, checkpoint)."""
