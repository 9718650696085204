"""Errors a user can cause. The CLI prints a UserError's message as one line and exits with code 2."""


class UserError(Exception):
    """A mistake the user can fix (bad file, flag, password, mismatched checkpoint): the message says what and where."""
