"""Errors raised by the data readers."""


class DataFormatError(ValueError):
  """Malformed input; message names file:line."""
