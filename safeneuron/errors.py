"""The one base class of every error caused by the user's input.

The CLI turns a :class:`SafeneuronError` into a one-line message and exit code 2;
anything else is a bug and keeps its traceback. Library messages name config fields
(``set lora``), never command-line flags: an error's ``fields`` lists the fields it
is about, and the CLI adds their flag spelling (``--lora``).
"""


class SafeneuronError(ValueError):
    """Bad input: a file, flag, model or artifact that cannot be used as given.

    Args:
        message: one line naming the problem and what to do.
        fields: the config fields (or stage arguments such as ``out``) the message is about.
    """

    def __init__(self, message: str = "", *, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.fields = tuple(fields)
