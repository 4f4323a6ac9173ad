"""How loraplex's processes log: one format for the server and its engine process.

Every line carries the time to the millisecond (as vLLM's logs do), so what waited for
what (an adapter's load against its request's first token, say) can be read from a log.
"""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%m-%d %H:%M:%S"


def configure_logging() -> None:
    """WARNING and above for every library, in LOG_FORMAT (loraplex's own level is set apart)."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, datefmt=DATE_FORMAT)
