"""Errors raised for bad input. ``InputError`` is a ``ValueError`` so callers can catch either."""


class InputError(ValueError):
    """A bad argument, batch, loader or numerical state; the message names the problem."""
