"""The one error dd-scaling reports as a single line with exit code 2 (bad input, nothing ran)."""


class ScalingError(Exception):
    """Bad input: one line, exit code 2."""
