"""The exceptions star-edge raises. Every error a user can cause is one of these, with a message that
names what was wrong; the CLI prints that message on one line and exits 2."""


class StarEdgeError(Exception):
    """Base class of every star-edge error."""


class InvalidInputError(StarEdgeError, ValueError):
    """A bad image, query or argument given by the caller."""


class BundleError(StarEdgeError):
    """A model bundle with missing, corrupt, truncated or mismatched files."""


class BackendUnavailableError(StarEdgeError):
    """A backend whose runtime is not installed or cannot run here (e.g. TensorRT without CUDA).

    The message carries the install hint.
    """


class NumericalError(StarEdgeError):
    """A model produced NaN or infinite values (e.g. float16 activations that overflowed)."""
