"""Shared glue for the rule scripts: logging to the rule's log file, and the rule's thread count.

Snakemake puts this folder on ``sys.path`` when it runs a script, so ``import _common`` works.
"""

import logging
import sys

import numba
from threadpoolctl import threadpool_limits

# Kept for the life of the script: BLAS pools stay at the rule's thread count.
_BLAS_LIMIT = None


def use_rule_threads(threads: int) -> int:
    """Run Numba kernels and BLAS on the rule's ``threads``, no more.

    Without this every job uses every core it sees, so two local jobs or a SLURM job on a shared
    node oversubscribe the machine; and a cluster's ``--set-threads`` would have no effect.
    """
    global _BLAS_LIMIT
    threads = max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    _BLAS_LIMIT = threadpool_limits(limits=threads, user_api="blas")
    return threads


def setup_logging(snakemake) -> logging.Logger:
    """Send log records and uncaught exceptions to the rule's log file (and stderr); use the
    rule's thread count."""
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
    threads = use_rule_threads(snakemake.threads)
    logger.info("running on %d thread(s)", threads)
    return logger
