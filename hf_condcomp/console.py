"""Where the command line writes: a command's result on stdout, everything else on stderr.

Libraries print to stdout while a command runs: DeepSpeed, when installed, logs "Setting accelerator
to CPU" there from the first `save_pretrained` (transformers imports it to unwrap models). `hf-condcomp
--json` output must stay parseable and a summary must be the only thing a pipe reads, so `commands`
points stdout at stderr for the command's run and `emit` writes results to the stdout it replaced.
"""

import contextlib
import logging
import sys

_result_stream = None


def emit(text: str) -> None:
    """Print one result (a summary, a table, JSON) on the command's stdout."""
    print(text, file=_result_stream or sys.stdout)


def _stdout_handlers() -> list:
    """The logging handlers that write to the current stdout (made before the command ran)."""
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                     if isinstance(v, logging.Logger))]
    return [h for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stdout]


@contextlib.contextmanager
def results_on_stdout_only():
    """Everything printed or logged to stdout inside goes to stderr, except what `emit` prints."""
    global _result_stream
    previous, _result_stream = _result_stream, sys.stdout
    handlers = _stdout_handlers()
    for handler in handlers:
        handler.setStream(sys.stderr)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for handler in handlers:
            handler.setStream(_result_stream)
        _result_stream = previous
