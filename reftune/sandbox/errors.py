"""The sandbox's refusals: exception classes and the stub that stands in for a forbidden function.

Standard library only and imports nothing of its siblings: every other module of the sandbox may
import it (the lowest layer of the package).
"""


class Forbidden(Exception):
    """A policy refusal, reported as "forbidden: <what>"."""


class ForbiddenImport(Forbidden, ImportError):  # so that `try: import numpy / except ImportError` works
    pass


class ForbiddenAttr(Forbidden, AttributeError):  # so that hasattr() says False
    pass


def forbidden_stub(name):
    """A function named `name` that raises Forbidden("<name>()") whatever it is called with."""

    def stub(*args, **kwargs):
        raise Forbidden(f"{name}()")

    stub.__name__ = stub.__qualname__ = name
    return stub
