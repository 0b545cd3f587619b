# All Python of the workflow lives here (snakemake --lint asks rules and functions apart).
import importlib.util
import json
import sys
from pathlib import Path

from snakemake.logging import logger
from snakemake.utils import validate

# Fills in the schema's defaults at every depth (each dataset's simulate block too; a test in
# tests/test_workflow.py checks it): they live only in the schema.
validate(config, schema="../schemas/config.schema.yaml", set_default=True)

DATASETS = sorted(config["datasets"])
RECON = config["reconstruction"]
SEEDS = [str(s) for s in RECON["seeds"]]
ENV = "../../envs/cryoday.yaml"


def _load_planning():
    # By path, standard library only: this process may not have cryoday's environment.
    path = Path(workflow.basedir) / "workflow" / "rules" / "planning.py"
    spec = importlib.util.spec_from_file_location("cryoday_workflow_planning", path)
    planning = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = planning  # dataclasses look their module up there
    spec.loader.exec_module(planning)
    return planning


def _plan_stages():
    """Each dataset's stages, fitted to its Nyquist limit; said once, before any job runs."""
    planning = _load_planning()
    try:
        planning.check_decreasing(RECON["stages_A"])
        planning.check_symmetry(RECON["symmetry"], "reconstruction.symmetry")
        for name in DATASETS:
            if "symmetry" in config["datasets"][name]:
                planning.check_symmetry(
                    config["datasets"][name]["symmetry"], f"datasets.{name}.symmetry"
                )
    except planning.PlanError as exc:
        raise SystemExit(f"cryoday: {exc}") from None
    plans = {}
    for name in DATASETS:
        plan, message = planning.plan_dataset(
            name, config["datasets"][name], RECON["stages_A"]
        )
        if message:
            logger.warning(message)
        plans[name] = plan
    return plans


STAGE_PLANS = _plan_stages()


wildcard_constraints:
    dataset="|".join(DATASETS),
    stage=r"\d+",
    seed=r"-?\d+",


def dataset_config(wildcards):
    return config["datasets"][wildcards.dataset]


def is_simulated(name):
    return "simulate" in config["datasets"][name]


def input_particles(wildcards):
    """The particle STAR file a dataset starts from: the user's, or the simulated one."""
    if is_simulated(wildcards.dataset):
        return f"results/{wildcards.dataset}/simulated/particles.star"
    return config["datasets"][wildcards.dataset]["particles"]


def reference_map(wildcards):
    """A map to compare with: the simulation's truth or the user's reference (may be none)."""
    if is_simulated(wildcards.dataset):
        return [f"results/{wildcards.dataset}/simulated/truth.mrc"]
    ref = config["datasets"][wildcards.dataset].get("reference")
    return [ref] if ref else []


def user_reference(wildcards):
    """The user's reference map, checked at preprocessing (none for simulations)."""
    ref = config["datasets"][wildcards.dataset].get("reference")
    return [ref] if ref else []


def dataset_stages(name):
    """A dataset's stage resolutions (A), coarse first: ``reconstruction.stages_A`` fitted to
    the data's Nyquist limit (see workflow/rules/planning.py)."""
    return STAGE_PLANS[name].stages_A


def dataset_stages_A(wildcards):
    return dataset_stages(wildcards.dataset)


def stage_resolution(wildcards):
    return float(dataset_stages(wildcards.dataset)[int(wildcards.stage) - 1])


def stage_stack_groups():
    """The rules that crop the stage stacks, ``{name: (number of stages, datasets)}``.

    One job per dataset writes all its stages' stacks. Outputs are fixed patterns, so datasets
    with different stage counts need one of these per count: ``stage_stacks``, or
    ``stage_stacks_<count>`` for each count when the datasets' counts differ."""
    counts = {}
    for name in DATASETS:
        counts.setdefault(len(dataset_stages(name)), []).append(name)
    if len(counts) == 1:
        ((count, names),) = counts.items()
        return {"stage_stacks": (count, names)}
    return {
        f"stage_stacks_{count}": (count, names)
        for count, names in sorted(counts.items())
    }


# Keys of the reconstruction section no single stage reads: a change to them (another seed,
# a stage appended) must not make finished stages "Params have changed".
NOT_STAGE_KEYS = ("seeds", "stages_A", "refine_rounds")


def stage_refine_rounds(wildcards):
    """The EM rounds a stage runs after its final pass: ``reconstruction.refine_rounds`` for the
    last stage of one class, 0 otherwise (so the other stages' params do not carry it).
    """
    last = int(wildcards.stage) == len(dataset_stages(wildcards.dataset))
    return (
        int(RECON["refine_rounds"])
        if last and dataset_classes(wildcards.dataset) == 1
        else 0
    )


def dataset_symmetry(name):
    """A dataset's point group as configured: its own ``symmetry`` key, else
    ``reconstruction.symmetry`` (may be ``auto``)."""
    return config["datasets"][name].get("symmetry", RECON["symmetry"])


def dataset_classes(name):
    """A dataset's number of classes: its own ``classes`` key, else ``reconstruction.classes``."""
    return int(config["datasets"][name].get("classes", RECON["classes"]))


def symmetry_of(wildcards):
    return dataset_symmetry(wildcards.dataset)


def truth_symmetry(wildcards):
    """A simulation's point group (``simulate.symmetry``), or None."""
    return config["datasets"][wildcards.dataset].get("simulate", {}).get("symmetry")


def stage_options(wildcards):
    """The reconstruction settings one stage reads (``cryoday.stage_config.StageConfig.from_config``
    and the rule script's random start), and no others.

    ``symmetry`` is the dataset's (:func:`dataset_symmetry`), and left out when the stage
    trains in C1 (``auto`` too): a C1 stage's params are those it had before symmetry existed.
    """
    options = {
        k: v for k, v in RECON.items() if k not in NOT_STAGE_KEYS + ("symmetry",)
    }
    group = dataset_symmetry(wildcards.dataset)
    if group.strip().upper() not in ("C1", "AUTO"):
        options["symmetry"] = group
    # Left out for one class likewise: its params are those it had before classes existed.
    options.pop("classes", None)
    if dataset_classes(wildcards.dataset) > 1:
        options["classes"] = dataset_classes(wildcards.dataset)
    if isinstance(options["undersampling"], list):
        # The schedule reads the factor at the stage's index (1 beyond the list's end), so the
        # factors of later stages are not this stage's.
        options["undersampling"] = options["undersampling"][: int(wildcards.stage)]
    return options


def previous_stage(wildcards):
    """The state a stage starts from: nothing for the first stage (random start)."""
    stage = int(wildcards.stage)
    if stage == 1:
        return []
    previous = (
        f"results/{wildcards.dataset}/abinitio/seed{wildcards.seed}/stage{stage - 1}"
    )
    # The class maps only with classes: a one-class stage's inputs are as before they existed.
    extra = ["classes.npz"] if dataset_classes(wildcards.dataset) > 1 else []
    return [f"{previous}/{name}" for name in ["volume.mrc", "state.npz"] + extra]


def stage_noise(wildcards):
    """The noise spectrum a stage runs with: preprocessing's for the first stage, then the one
    the previous stage refined from its residuals."""
    stage = int(wildcards.stage)
    if stage == 1:
        return f"results/{wildcards.dataset}/preprocess/noise_spectrum.tsv"
    return f"results/{wildcards.dataset}/abinitio/seed{wildcards.seed}/stage{stage - 1}/noise_spectrum.tsv"


def last_stage_of_seed(name, seed):
    return f"results/{name}/abinitio/seed{seed}/stage{len(dataset_stages(name))}"


def stage_size(input):
    """(images, box) of a stage's cropped stack, or None before the stack exists."""
    info_path, stack_path = Path(input.info), Path(input.stack)
    if not (info_path.exists() and stack_path.exists()):
        return None
    box = int(json.loads(info_path.read_text())["box"])
    return max(1, (stack_path.stat().st_size - 1024) // (4 * box * box)), box


def stage_mem_mb(wildcards, input, attempt):
    """Memory (MB) a stage needs, from its image count and box; doubled on each retry.

    Snakemake evaluates this again once the stage's images exist (before it submits the job),
    so the figure is the estimate for the real data; before that, a 4 GB placeholder. The
    terms: SAGD's stored gradients (one float32 volume per minibatch of the at most
    ``max_particles`` images it trains on), the images kept in memory
    (at most 2 GiB, streamed beyond), and the likelihood's working set: per block of at most
    4,000 directions, their slices and per-thread gradient accumulators (~70 bytes per direction
    and Fourier pixel inside the cutoff on 2 threads), plus the padded transforms of the
    four minibatches a stage keeps (its line search and held-out set revisit them), and the
    per-particle records every particle holds whatever the cap: its importance store (1.2 kB,
    0.5 kB more while a stage runs), its row of the particle table and CTF, its final pose
    (about 3 kB in all, measured beyond the images at 200,000 particles). With K classes the
    stored gradients, the working set of slices and the importance stores are K times one
    class's (each class has its own gradients and posteriors, and its nll pass its own slices).
    """
    size = stage_size(input)
    if size is None:
        return 4000 * attempt
    n_images, box = size
    n_classes = dataset_classes(wildcards.dataset)
    cap = RECON["max_particles"]
    n_batches = -(-min(n_images, cap or n_images) // RECON["minibatch_size"])
    gradients = n_classes * n_batches * box**3 * 4
    images = min(n_images * box * box * 4, 2 << 30)
    likelihood = (
        n_classes * 4000 * 0.8 * box * box * 70
        + 4 * RECON["minibatch_size"] * (3 * box) ** 2 * 8
    )
    records = n_images * (1700 * n_classes + 1300)
    return int(1000 + (gradients + images + likelihood + records) / 1e6) * attempt


def stage_runtime(wildcards, input, attempt):
    """Minutes a stage may run: 100 ms per image and iteration at a 64-px stage box, as box^2.

    Measured: the demo's 10 A stage (44 px) took 7.3 s per 200-image iteration on 2 cores shared
    with another job, 78 ms per image scaled to 64 px. A time limit beyond the need is harmless;
    one below it kills the job, which then resumes from its checkpoint. Doubled on each retry;
    times the number of classes (K classes cost at most about K times one per iteration).
    """
    size = stage_size(input)
    if size is None:
        return 240 * attempt * dataset_classes(wildcards.dataset)
    _, box = size
    per_iteration_s = (
        RECON["minibatch_size"]
        * 0.1
        * (box / 64) ** 2
        * dataset_classes(wildcards.dataset)
    )
    return int(30 + RECON["max_iterations"] * per_iteration_s / 60) * attempt


def final_outputs():
    outputs = []
    for name in DATASETS:
        outputs += [
            f"results/{name}/final/volume.mrc",
            f"results/{name}/final/particles.star",
            f"results/{name}/final/particles.cs",
            f"results/{name}/final/map_full.mrc",
            f"results/{name}/final/map_sharpened.mrc",
            f"results/{name}/final/final_map.json",
            f"results/{name}/validation/metrics.json",
            f"results/{name}/report.html",
        ]
        # One class (the default) has no class outputs: its runs plan what they planned before.
        if dataset_classes(name) > 1:
            outputs.append(f"results/{name}/final/classes.json")
            for k in range(1, dataset_classes(name) + 1):
                outputs += [
                    f"results/{name}/final/class{k}/volume.mrc",
                    f"results/{name}/final/class{k}/particles.star",
                ]
    return outputs


def simulate_params(wildcards):
    return config["datasets"][wildcards.dataset]["simulate"]


def pixel_size_override(wildcards):
    return config["datasets"][wildcards.dataset].get("pixel_size")


# --- inputs of finalize, validate and report
def seed_stage_files(wildcards):
    """Every random start's stage records, seed-major (each stage of the first seed in order,
    then the next seed's; seeds in config order): ``histories`` and ``volumes``, one per seed
    and stage. ``cryoday.validation.by_seed`` splits them back per seed."""
    stages = [
        f"results/{wildcards.dataset}/abinitio/seed{s}/stage{st}"
        for s in SEEDS
        for st in range(1, len(dataset_stages(wildcards.dataset)) + 1)
    ]
    return {
        "histories": [f"{d}/history.tsv" for d in stages],
        "volumes": [f"{d}/volume.mrc" for d in stages],
    }


def seed_last_poses(wildcards):
    """Each random start's last ``poses.npz`` (seeds in config order)."""
    return [f"{last_stage_of_seed(wildcards.dataset, s)}/poses.npz" for s in SEEDS]


def last_stage_files(wildcards):
    """Each random start's last stage (seeds in config order): ``histories``, ``volumes`` and
    ``poses``, one per seed."""
    return {
        kind: [f"{last_stage_of_seed(wildcards.dataset, s)}/{name}" for s in SEEDS]
        for kind, name in (
            ("histories", "history.tsv"),
            ("volumes", "volume.mrc"),
            ("poses", "poses.npz"),
        )
    }


def class_records(wildcards):
    """Each random start's last ``classes.npz`` and ``poses.npz`` (seeds in config order):
    ``classes`` and ``poses``."""
    return {
        kind: [f"{last_stage_of_seed(wildcards.dataset, s)}/{name}" for s in SEEDS]
        for kind, name in (("classes", "classes.npz"), ("poses", "poses.npz"))
    }


def class_inputs(wildcards):
    """What validate and make_report read of the classes, only with K > 1 (a run of one class
    keeps the inputs it had): every start's ``classes.npz`` per stage (``class_stages``,
    seed-major like :func:`seed_stage_files`)."""
    if dataset_classes(wildcards.dataset) == 1:
        return {}
    return {
        "class_stages": [
            f"results/{wildcards.dataset}/abinitio/seed{s}/stage{st}/classes.npz"
            for s in SEEDS
            for st in range(1, len(dataset_stages(wildcards.dataset)) + 1)
        ],
    }


def final_map_classes(wildcards):
    """With K > 1, each start's last ``classes.npz`` and ``poses.npz`` (``class_maps``,
    ``class_poses``): the main class's half maps weight each particle by its posterior for it.
    None for one class (the rule's inputs stay as they were)."""
    if dataset_classes(wildcards.dataset) == 1:
        return {}
    records = class_records(wildcards)
    return {"class_maps": records["classes"], "class_poses": records["poses"]}


def truth_particles(wildcards):
    """A simulation's particles with their true poses (none for a user's data set)."""
    if is_simulated(wildcards.dataset):
        return [f"results/{wildcards.dataset}/simulated/particles.star"]
    return []


def report_settings(wildcards):
    """The configuration one dataset's run used (its own block, not the other datasets')."""
    settings = {key: value for key, value in config.items() if key != "datasets"}
    return {"datasets": {wildcards.dataset: dataset_config(wildcards)}, **settings}


# --- inputs of final_map
def final_map_states(wildcards):
    """Each random start's last ``state.npz`` (its pose posteriors; seeds in config order)."""
    return {
        "states": [
            f"{last_stage_of_seed(wildcards.dataset, s)}/state.npz" for s in SEEDS
        ]
    }


def final_map_shards(wildcards):
    """With ``shards`` > 1, every shard's insertion sums (``shards``); none otherwise (one job,
    whose inputs stay as they were)."""
    n = int(config["shards"])
    if n == 1:
        return {}
    return {
        "shards": [
            f"results/{wildcards.dataset}/final/shards/sums_{k}_of_{n}.npz"
            for k in range(1, n + 1)
        ]
    }


def final_map_symmetry(wildcards):
    """The point group the final map's poses are expanded by: the one the dataset's stages
    trained in (``auto`` trains in C1, and its group, found afterwards, is not on the map's
    axes)."""
    group = dataset_symmetry(wildcards.dataset)
    return "C1" if group.strip().upper() in ("C1", "AUTO") else group


def final_map_mem_mb(wildcards, input, attempt):
    """Memory (MB) of the final map: the insertion's cubes of twice the box (per thread (2)
    float32 sums of 16 bytes a voxel, the complex128 numerator and float64 denominator they are
    added into, and the first half's while the second is made), a few full-box maps, a chunk of
    images, and the posterior's poses: the candidates of one block of 50,000 particles (18
    each, ~300 bytes while they are built) and those kept (at most 18 per particle, ~110 bytes
    each; 2.2 on average at a sharp last stage); doubled on each retry. A 2 GB placeholder
    before the preprocessed set exists. With shards, a shard job's poses are its particles',
    and the job adding the shards up makes none but holds twice the cubes."""
    info = Path(input.info)
    if not info.exists():
        return 2000 * attempt
    meta = json.loads(info.read_text())
    box, n = int(meta["box"]), int(meta["n_particles"])
    cubes = (2 * 16 + 24 + 24 + 16) * (2 * box + 3) ** 3 + 12 * box**3 * 8
    if "n_shards" in wildcards.keys():
        n = -(-n // int(wildcards.n_shards))
    elif int(config["shards"]) > 1:
        # Both halves' running sums and one shard's being added: twice the cubes.
        n, cubes = 0, 2 * cubes
    poses = min(n, 50_000) * 18 * 300 + n * 18 * 110
    return int(1000 + (cubes + poses) / 1e6) * attempt
