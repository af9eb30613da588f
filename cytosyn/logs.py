"""One log handler for every ``cytosyn`` verb: each line printed once, in one format.

Libraries attach their own stream handlers to their loggers and still let records propagate to the
root: Lightning adds one to ``lightning`` when it is imported, huggingface_hub to ``huggingface_hub``,
diffusers to ``diffusers`` (without propagation, in another format). With a root handler configured as
well, every Lightning and hub line came out twice. Because those handlers appear whenever the library
is first imported — often long after logging was set up, and data_prep verbs never import them at all —
:func:`setup_logging` installs a log-record factory that, the first time a logger emits, removes the
console handlers that library code added on the way from that logger to the root and turns propagation
back on. The root keeps the only console handler. Handlers writing to files (and test capture handlers
on the root) are left alone.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["FORMAT", "setup_logging"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_MARK = "_cytosyn_handler"
_cleaned: set[str] = set()


def _is_console(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return (
        type(handler) is logging.StreamHandler  # not FileHandler or a capture subclass
        and stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
        and not getattr(handler, _MARK, False)
    )


def _route_to_root(name: str) -> None:
    """Strip library console handlers from ``name`` and its ancestors (below the root); propagate."""
    while name and name not in _cleaned:
        _cleaned.add(name)
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if _is_console(h)]:
            logger.removeHandler(handler)
        logger.propagate = True
        name = name.rpartition(".")[0]


def setup_logging(verbose: bool = False) -> logging.Handler:
    """The root's single console handler (stderr, :data:`FORMAT`), INFO or DEBUG; returns it.

    Calling it again replaces the handler it installed before (tests, several ``main`` calls)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    setattr(handler, _MARK, True)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    _cleaned.clear()
    factory = logging.getLogRecordFactory()
    base = getattr(factory, "_cytosyn_base", factory)

    def record_factory(name: str, *args, **kwargs) -> logging.LogRecord:
        if name not in _cleaned:
            _route_to_root(name)
        return base(name, *args, **kwargs)

    record_factory._cytosyn_base = base  # type: ignore[attr-defined]
    logging.setLogRecordFactory(record_factory)
    return handler
