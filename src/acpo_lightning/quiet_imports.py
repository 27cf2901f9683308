"""Keep known, harmless import-time log messages of dependencies off the user's terminal.

peft imports bitsandbytes, and diffusers' model classes import peft. On a CPU with AVX512-BF16,
bitsandbytes then logs ``Failed to load CPU gemm_4bit_forward from kernels-community ... pip
install kernels`` at import (with ``kernels`` installed and ``HF_HUB_OFFLINE`` set, ``kernels`` first
logs that it skips the kernel's publisher check): an optional kernel for 4-bit CPU inference,
which ACPO never uses.
The few imports that first pull in peft (:mod:`acpo_lightning.models.lora`,
:mod:`acpo_lightning.testing`, :mod:`acpo_demo.assets`) run inside :func:`quiet_imports`,
which drops exactly that message while they run and leaves logging as it was afterwards: it is
logged once per process, at import, so nothing else is hidden.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

#: (logger, start of the message) of each dropped message.
QUIET_MESSAGES = (
    (
        "bitsandbytes.backends.cpu.ops",
        "Failed to load CPU gemm_4bit_forward from kernels-community",
    ),
    # the same kernel's lookup through the `kernels` package (a dependency of transformers 5.2x),
    # which says so first when HF_HUB_OFFLINE is set
    (
        "kernels._internals.hf_hub",
        "Skipping publisher trust check for 'kernels-community/",
    ),
)


class _DropMessage(logging.Filter):
    """Drops records whose (unformatted) message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextmanager
def quiet_imports() -> Iterator[None]:
    """Drop the messages of :data:`QUIET_MESSAGES` while the block runs (wrap imports in it).

    Example:
        >>> with quiet_imports():
        ...     import peft
    """
    filters = [(logging.getLogger(name), _DropMessage(prefix)) for name, prefix in QUIET_MESSAGES]
    for logger, message_filter in filters:
        logger.addFilter(message_filter)
    try:
        yield
    finally:
        for logger, message_filter in filters:
            logger.removeFilter(message_filter)
