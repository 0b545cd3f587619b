"""Rule `simulate`: a particle set from a ground-truth map by the paper's generative model."""

from pathlib import Path
from typing import TYPE_CHECKING

from _common import setup_logging

from cryoday import io, molecule, simulate
from cryoday.errors import InputError
from cryoday.fourier import rescale_volume

if TYPE_CHECKING:
    from snakemake.script import snakemake
elif "snakemake" not in globals():  # run by hand: python scripts/simulate.py dataset=demo
    from _common import argv_wildcards, mock_snakemake

    snakemake = mock_snakemake("simulate", **argv_wildcards())

log = setup_logging(snakemake)
opts = snakemake.params.simulate
box, pixel_size = int(opts["box"]), float(opts["pixel_size"])


def load_density(source, key):
    """The density ``simulate.<key>`` names, on the simulation's grid."""
    if source == "synthetic":
        density = molecule.synthetic_molecule(box, pixel_size, seed=int(opts["seed"]))
        log.info("%s: built-in synthetic molecule, %d px at %.3f A/px", key, box, pixel_size)
    elif source == "synthetic-other":
        density = molecule.other_molecule(box, pixel_size, seed=int(opts["seed"]))
        log.info("%s: built-in second (elongated) molecule, %d px at %.3f A/px", key, box,
                 pixel_size)
    elif Path(source).suffix.lower() in {".pdb", ".cif", ".mmcif", ".ent"}:
        density = molecule.density_from_model(source, box, pixel_size,
                                              resolution_A=2 * pixel_size)
        log.info("%s: density of atomic model %s, %d px at %.3f A/px", key, source, box,
                 pixel_size)
    else:
        volume, voxel_size = io.read_map(source)
        voxel_size = voxel_size or opts.get("source_pixel_size")
        if not voxel_size:
            raise InputError(
                f"{source}: the map header gives no voxel size; set simulate.source_pixel_size"
            )
        density = rescale_volume(volume, voxel_size, box, pixel_size)
        log.info("%s: map %s (%d px at %.3f A/px) resampled to %d px at %.3f A/px",
                 key, source, volume.shape[0], voxel_size, box, pixel_size)
    return density.clip(min=0) if density.min() >= -1e-3 * density.max() else density


truth = load_density(opts["source"], "source")
junk_fraction = float(opts.get("junk_fraction", 0.0))
junk_kind = opts.get("junk_kind", "mixed")
junk_volume = None
if junk_fraction > 0 and junk_kind != "noise":
    junk_volume = load_density(opts.get("junk_source", "synthetic-other"), "junk_source")
n_micrographs = opts.get("n_micrographs")
n = int(opts["n_particles"])
tables = []
with io.StackWriter(snakemake.output.stack, n, box, pixel_size) as writer:
    start = 0
    for images, table in simulate.simulate_chunks(
        truth,
        pixel_size,
        n,
        snr=float(opts["snr"]),
        defocus_range_A=tuple(opts["defocus_range_A"]),
        astigmatism_A=float(opts["astigmatism_A"]),
        voltage=float(opts["voltage_kV"]),
        cs=float(opts["cs_mm"]),
        amplitude_contrast=float(opts["amplitude_contrast"]),
        shift_sigma_A=float(opts["shift_sigma_A"]),
        seed=int(opts["seed"]),
        noise_spectrum=opts.get("noise_spectrum", "white"),
        bfactor_A2=float(opts.get("bfactor_A2", 0.0)),
        n_micrographs=None if n_micrographs is None else int(n_micrographs),
        defocus_spread_A=float(opts.get("defocus_spread_A", 0.0)),
        extraction=opts.get("extraction", "periodic"),
        junk_fraction=junk_fraction,
        junk_kind=junk_kind,
        junk_volume=junk_volume,
    ):
        writer.data[start : start + len(images)] = images
        start += len(images)
        tables.append(table)
        log.info("simulated %d / %d particles", start, n)

import pandas as pd  # noqa: E402  (only needed here)

table = pd.concat(tables, ignore_index=True)
if simulate.JUNK_COLUMN in table:
    counts = table[simulate.JUNK_COLUMN].value_counts()
    log.info("junk rows (column %s): %d pure noise, %d another map's projections",
             simulate.JUNK_COLUMN, counts.get(simulate.JUNK_NOISE, 0),
             counts.get(simulate.JUNK_OTHER, 0))
stack_name = Path(snakemake.output.stack).name
table["rlnImageName"] = [f"{i + 1:06d}@{stack_name}" for i in range(n)]
optics = simulate.optics_table(
    pixel_size, box, float(opts["voltage_kV"]), float(opts["cs_mm"]),
    float(opts["amplitude_contrast"]),
)
io.write_particles(snakemake.output.star, table, optics)
io.write_map(snakemake.output.truth, truth, pixel_size)
log.info("wrote %s, %s and %s", snakemake.output.star, snakemake.output.stack,
         snakemake.output.truth)
