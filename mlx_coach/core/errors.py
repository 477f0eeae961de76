"""The one exception type for bad user input (config, dataset, arguments, model path).

The CLI turns it into a one-line message on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user. The message names the field, key or file:line at fault."""


class RunStopped(Exception):
    """A run stopped on purpose by a condition it was told to stop on (rewards[].on_outage: stop).
    Its finished steps are checkpointed; the CLI prints the one-line reason and exits with 3."""
