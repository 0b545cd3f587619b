"""Shared glue for the rule scripts: logging, errors, the rule's thread count, and a stand-in for
the ``snakemake`` object so a script runs outside Snakemake.

Snakemake puts this folder on ``sys.path`` when it runs a script (and Python does when a script
is run by hand), so ``import _common`` works either way. Each script starts with

    if TYPE_CHECKING:
        from snakemake.script import snakemake
    elif "snakemake" not in globals():  # run by hand: python scripts/NAME.py dataset=demo ...
        from _common import argv_wildcards, mock_snakemake

        snakemake = mock_snakemake("RULE", **argv_wildcards())
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numba
from threadpoolctl import threadpool_limits

from cryoday.errors import InputError

REPO = Path(__file__).resolve().parents[1]
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


class _NotFileOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


def setup_logging(snakemake) -> logging.Logger:
    """Send log records to the rule's log file and stderr; report uncaught exceptions; use the
    rule's thread count.

    An uncaught exception's traceback goes to the log file only; stderr, which Snakemake shows
    among every job's output, gets one line: ``cryoday: <message>`` for bad input
    (``InputError``), the exception and the log's path otherwise. Without a log file (a script
    run by hand) the traceback goes to stderr.
    """
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.addFilter(_NotFileOnly())
    handlers: list[logging.Handler] = [to_stderr]
    log_path = snakemake.log[0] if snakemake.log else None
    if log_path:
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=handlers,
        force=True,
    )
    logger = logging.getLogger(f"cryoday.{snakemake.rule}")

    def report_uncaught(exc_type, exc, tb):
        if not log_path or not issubclass(exc_type, Exception):
            sys.__excepthook__(exc_type, exc, tb)
            return
        logger.error("%s: %s", exc_type.__name__, exc, exc_info=(exc_type, exc, tb),
                     extra={"file_only": True})
        if issubclass(exc_type, InputError):
            print(f"cryoday: {exc}", file=sys.stderr)
        else:
            print(f"cryoday: {exc_type.__name__}: {exc} (traceback in {log_path})",
                  file=sys.stderr)

    sys.excepthook = report_uncaught
    threads = use_rule_threads(snakemake.threads)
    logger.info("running on %d thread(s)", threads)
    return logger


def argv_wildcards(argv=None) -> dict[str, str]:
    """``KEY=VALUE`` command-line arguments as a dict (wildcards, and ``configfile``)."""
    argv = sys.argv[1:] if argv is None else argv
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise SystemExit(f"usage: {Path(sys.argv[0]).name} WILDCARD=VALUE ... "
                         f"[configfile=PATH] (got {bad[0]!r})")
    return dict(a.split("=", 1) for a in argv)


def mock_snakemake(rule_name: str, configfile=None, **wildcards):
    """The ``snakemake`` object Snakemake would give rule ``rule_name``'s script for these
    wildcards, run from the current directory as the workdir.

    Snakemake's own API parses the Snakefile (with ``configfile`` on top of ``config.yaml``) and
    builds the job, so input functions, params, threads and resources are the rule's own.
    Output and log folders are created, as Snakemake does before a job runs; inputs are not
    made: run their rules first.
    """
    from snakemake.api import SnakemakeApi
    from snakemake.dag import DAG
    from snakemake.jobs import Job
    from snakemake.script import Snakemake
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    configfiles = [Path(configfile).resolve()] if configfile else []
    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        workflow_api = api.workflow(ResourceSettings(cores=numba.config.NUMBA_NUM_THREADS),
                                    ConfigSettings(configfiles=configfiles),
                                    snakefile=REPO / "Snakefile", workdir=Path.cwd())
        workflow_api.dag()  # the DAG settings a Job needs
        workflow = workflow_api._workflow
        rule = workflow.get_rule(rule_name)
        if set(wildcards) != set(rule.wildcard_names):
            raise SystemExit(f"rule {rule_name} needs the wildcards "
                             f"{' '.join(f'{w}=...' for w in sorted(rule.wildcard_names))}")
        job = Job(rule, DAG(workflow, rules=[rule]), wildcards)
        snakemake = Snakemake(job.input, job.output, job.params, job.wildcards, job.threads,
                              job.resources, job.log, workflow.config, rule_name, None,
                              scriptdir=str(REPO / "scripts"))
    for path in [*snakemake.output, *snakemake.log]:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    return snakemake


def final_map_inputs(snakemake):
    """What the final map (and each of its shards) takes from the run: the chosen start's last
    ``state.npz`` (None without posteriors), and with K > 1 classes its main class's posterior
    weights per particle and the class (1-based; None, None for one class); then the seed."""
    import json

    from cryoday import records

    seeds = [int(s) for s in snakemake.params.seeds]
    chosen = int(json.loads(Path(snakemake.input.choice).read_text())["chosen_seed"])
    # The chosen start's last pose posteriors (common.smk lists every seed's, in config order).
    state = snakemake.input.states[seeds.index(chosen)] if snakemake.input.states else None
    class_weights = main_class = None
    if getattr(snakemake.input, "class_maps", None):
        main = records.read_classes(snakemake.input.class_maps[seeds.index(chosen)])["main"]
        poses = records.read_poses(snakemake.input.class_poses[seeds.index(chosen)])
        class_weights, main_class = records.class_posterior(poses)[:, main], main + 1
    return state, class_weights, main_class, chosen
