"""The one exception type that means "the user gave us something wrong"."""


class UserError(Exception):
    """Bad input (config, path, prompt, checkpoint). The CLI prints `scalegpt: error: <message>` and
    exits 2 with no traceback; the message says what is wrong and what to do."""


class SharedUserError(UserError):
    """A UserError that every rank raises together; only rank 0 prints it."""
