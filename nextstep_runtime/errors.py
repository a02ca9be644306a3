"""The one exception type the runtime raises for problems a user can fix.

Nodes and the CLI show its message as-is (no traceback), so every message names the file, tensor or
parameter at fault and, where there is one, the fix.
"""


class NextStepError(ValueError):
    """Bad input, a missing or corrupt file, or a model/VAE mismatch."""


class NonFiniteResult(NextStepError):
    """A computation gave NaN or infinite values (an overflow in half precision, or broken weights): stopped as soon
    as it is seen, naming the fix, rather than returning a black image as a success."""
