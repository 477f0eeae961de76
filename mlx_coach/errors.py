"""The one exception type for bad user input (config, dataset, arguments, model path).

The CLI turns it into a one-line message on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user. The message names the field, key or file:line at fault."""
