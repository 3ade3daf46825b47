"""Errors that reach the user as one line and a non-zero exit (see ``onnxdns.cli``)."""


class OnnxdnsError(Exception):
    """A problem with the user's input or request, reported as one line without a traceback."""


class UnsupportedModelError(OnnxdnsError):
    """The model uses an IR version, opset or operator this stack cannot run."""
