"""Errors that reach the user as one line and a non-zero exit, and the exit statuses of every command
(see ``onnxdns.cli``)."""

#: Exit statuses: success; internal error (a bug: traceback with --debug); user mistake or missing
#: extra (one line on stderr); validation of an optimized model failed (output kept); interrupted
#: (Ctrl-C; training saved a checkpoint); stdout closed early (e.g. piped into head).
EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_VALIDATION, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 2, 3, 130, 141


class OnnxdnsError(Exception):
    """A problem with the user's input or request, reported as one line without a traceback."""


class UnsupportedModelError(OnnxdnsError):
    """The model uses an IR version, opset or operator this stack cannot run."""
