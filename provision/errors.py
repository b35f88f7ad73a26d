"""Errors a user can cause: one clear line, no traceback."""


class ProvisionError(Exception):
    """A problem the user can fix; the message names the problem and the fix.

    ``code`` is the process exit status: 2 bad input, 3 host unreachable,
    1 a host failed.
    """

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class Unreachable(ProvisionError):
    def __init__(self, message: str):
        super().__init__(message, code=3)


class StepFailed(ProvisionError):
    def __init__(self, message: str):
        super().__init__(message, code=1)


class AuthFailed(ProvisionError):
    """The host refused the login (user or key)."""
