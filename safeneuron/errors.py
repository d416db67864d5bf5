"""The one base class of every error caused by the user's input.

The CLI turns a :class:`SafeneuronError` into a one-line message and exit code 2;
anything else is a bug and keeps its traceback.
"""


class SafeneuronError(ValueError):
    """Bad input: a file, flag, model or artifact that cannot be used as given."""
