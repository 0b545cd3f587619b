"""Shared glue for the rule scripts: logging to the rule's log file, and a stub for debugging.

Snakemake puts this folder on ``sys.path`` when it runs a script, so ``import _common`` works.
"""

import logging
import sys

def setup_logging(snakemake) -> logging.Logger:
    """Send log records and uncaught exceptions to the rule's log file (and stderr)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if snakemake.log:
        handlers.append(logging.FileHandler(snakemake.log[0], mode="w"))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=handlers,
        force=True,
    )
    logger = logging.getLogger(f"cryoday.{snakemake.rule}")

    def log_uncaught(exc_type, exc, tb):
        logger.error("%s: %s", exc_type.__name__, exc, exc_info=(exc_type, exc, tb))

    sys.excepthook = log_uncaught
    return logger
