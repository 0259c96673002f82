"""The one error type the data layer raises for bad input files."""

from shared.errors import FlowerbedError


class DataError(FlowerbedError, ValueError):
    """A data file is missing, unreadable, empty or malformed, or holds what no model trains on: a
    NaN or infinite value, a label that is not an integer class id.

    The message is one line that names the file and the problem.
    """
