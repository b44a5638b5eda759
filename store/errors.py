"""The one exception type that means "the user asked for something that cannot be done"."""


class HeadstartError(Exception):
    """A problem the user can fix, described in one sentence.

    The CLI prints the message and exits non-zero; anything else that escapes is a bug.
    """
