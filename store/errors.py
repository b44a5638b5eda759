"""The one exception type that means "the user asked for something that cannot be done"."""

#: How messages name the program when they suggest a command; a front end sets its own
#: (the CLI: "python cli.py", or "headstart" when run as the installed command).
PROGRAM = ["headstart"]


class HeadstartError(Exception):
    """A problem the user can fix, described in one sentence.

    The CLI prints the message and exits non-zero; anything else that escapes is a bug.
    """


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during work that keeps what it finished; the message says what was kept."""


def command(arguments: str) -> str:
    """A command line as a message suggests it: the program's name, then `arguments`."""
    return f"{PROGRAM[0]} {arguments}"


def set_program(name: str) -> None:
    """Name the program in suggested command lines (set once by the front end)."""
    PROGRAM[0] = name
