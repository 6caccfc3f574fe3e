"""The CLI's own refusals; app/cli/__init__.py is their one boundary."""


class CommandError(Exception):
    """A mistake in what the user asked for: one line on stderr, exit status 1."""
    status = 1


class UsageError(CommandError):
    """A command line that cannot be run as written (exit status 2, as argparse's own)."""
    status = 2
