"""argparse types that check a flag's range where it is parsed, so a bad value is one line naming
the flag (`argument --steps: must be an integer >= 1, got '-5'`) and exit code 2 (cli._Parser)."""

import argparse
import math


def int_at_least(lo):
    """An integer >= lo."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {lo}"
    return parse


def number_at_least(lo, *, open_=False):
    """A finite float >= lo (> lo with open_): NaN and infinity are refused (an infinite timeout
    would let a looping sample hang the command)."""
    op = ">" if open_ else ">="

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {op} {lo:g}, got {text!r}") from None
        if not math.isfinite(value) or value < lo or (open_ and value == lo):
            raise argparse.ArgumentTypeError(f"must be a finite number {op} {lo:g}, got {text!r}")
        return value

    parse.__name__ = f"number {op} {lo:g}"
    return parse


positive_int = int_at_least(1)
count = int_at_least(0)
positive_number = number_at_least(0, open_=True)
