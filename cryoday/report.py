"""The run's HTML report: one self-contained page (images embedded), readable offline."""

from __future__ import annotations

import base64
import csv
import functools
import html
import io as _io
import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import yaml

from cryoday import __version__, io, noise, records
from cryoday.validation import (
    NOISE_HIGH_BAND_A,
    NOISE_LOW_BAND_A,
    SIGNAL_Z,
    nyquist_shell,
    pooled_low_to_high,
)


def _png(fig) -> str:
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def map_views(volume: np.ndarray, title: str) -> str:
    """Central slices and projections along z, y and x."""
    fig, axes = plt.subplots(2, 3, figsize=(9, 6))
    c = volume.shape[0] // 2
    for i, (name, sl) in enumerate((("z", volume[c]), ("y", volume[:, c]), ("x", volume[:, :, c]))):
        axes[0, i].imshow(sl, cmap="gray", origin="lower")
        axes[0, i].set_title(f"central slice, normal {name}")
        axes[1, i].imshow(volume.sum(axis=i), cmap="gray", origin="lower")
        axes[1, i].set_title(f"projection along {name}")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    return _img(_png(fig), title)


def history_plot(seed_histories: dict) -> str:
    """Held-out error, objective, step size, grid fraction and pose KL against iteration.

    ``seed_histories`` is ``{seed: [history.tsv of each stage, in order]}``. Each random start
    runs its stages one after another on one iteration axis (a stage boundary shows as a new
    colour); seeds share the axis, told apart by line style. The KL panel shows the paper's
    Figure 3 measure, each image's pose posterior against its previous visit's (``kl_epoch``,
    dots), and the posterior against its importance proposal (``kl``, crosses); histories
    written before ``kl_epoch`` existed show the crosses only.
    """
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.6))
    seeds = [f"seed{s}" for s in seed_histories]
    styles = ["-", "--", ":", "-."]
    for (seed, paths), style in zip(seed_histories.items(), styles * len(seed_histories)):
        offset = 0
        for index, path in enumerate(paths):
            rows = records.read_history(path)
            if not rows:
                continue
            colour = f"C{index}"
            it = np.array([r["iteration"] for r in rows]) + offset
            label = f"stage{index + 1}" if f"seed{seed}" == seeds[0] else None
            held = np.array([r["heldout_nll"] for r in rows])
            good = np.isfinite(held)
            axes[0].plot(it[good], held[good], style, marker="o", ms=3, color=colour, label=label)
            axes[1].plot(it, [r["objective"] for r in rows], style, color=colour)
            axes[2].semilogy(it, [r["step"] for r in rows], style, color=colour)
            axes[3].semilogy(it, [r["n_evaluated"] / r["n_full"] for r in rows], style,
                             color=colour)
            for column, marker in (("kl_epoch", "."), ("kl", "x")):
                kl = np.array([r.get(column, np.nan) for r in rows])
                axes[4].plot(it[np.isfinite(kl)], kl[np.isfinite(kl)], marker, ms=3,
                             color=colour, alpha=1.0 if column == "kl_epoch" else 0.4)
            offset = int(it[-1])
    axes[0].set(xlabel="iteration", ylabel="held-out mean -log p(I|V)", title="held-out error")
    axes[1].set(xlabel="iteration", ylabel="mean -log posterior", title="objective")
    axes[2].set(xlabel="iteration", ylabel="step size eps/L", title="step size")
    axes[3].set(xlabel="iteration", ylabel="fraction of the grid evaluated",
                title="importance sampling")
    axes[4].set(xlabel="iteration", ylabel="KL (nats)",
                title="pose KL: between visits (.), posterior vs proposal (x)")
    axes[4].set_yscale("symlog", linthresh=0.1)
    axes[0].legend(fontsize=7, title=" / ".join(f"{s} {styles[i % 4]}" for i, s in
                                               enumerate(seeds)), title_fontsize=7)
    fig.tight_layout()
    return _img(_png(fig), "optimisation history")


def fsc_plot(fsc_path) -> str:
    with open(fsc_path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        return "<p>No FSC curves.</p>"
    freq = np.array([float(r["freq_invA"]) for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for column in rows[0]:
        if column.startswith("fsc"):
            ax.plot(freq, [float(r[column]) for r in rows], label=column)
    ax.axhline(0.143, color="gray", ls="--", lw=0.8)
    ax.axhline(0.5, color="gray", ls=":", lw=0.8)
    ax.set(xlabel="spatial frequency (1/A)", ylabel="FSC", ylim=(-0.1, 1.05))
    ax.legend()
    return _img(_png(fig), "FSC")


def isosurface_views(volume: np.ndarray, title: str) -> str:
    """Shaded surface views along z, y and x at a threshold enclosing 4% of the box.

    Protein occupies a few per cent of a typical box; the threshold is the density level above
    which 4% of the voxels lie. Each view is a depth map of the first voxel above it, shaded by
    the depth gradient (a simple ray cast: no extra dependency).
    """
    level = np.quantile(volume, 0.96)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3))
    n = volume.shape[0]
    for i, ax in enumerate(axes):
        v = np.moveaxis(volume, i, 0)
        above = v > level
        hit = above.any(axis=0)
        depth = np.where(hit, np.argmax(above, axis=0), n).astype(float)
        gy, gx = np.gradient(depth)
        shade = np.where(hit, 1.0 / np.sqrt(1 + gx**2 + gy**2) * (1.2 - depth / n), 0.0)
        ax.imshow(shade, cmap="bone", origin="lower")
        ax.set_title(f"surface seen along {'zyx'[i]}")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title} (threshold {level:.3g})")
    return _img(_png(fig), title)


def stage_maps(seed_volumes: dict) -> str:
    """Each stage's map projected along z, like the paper's Figure 5.

    ``seed_volumes`` is ``{seed: [volume.mrc of each stage, in order]}``.
    """
    panels = [(f"seed{seed}/stage{i + 1}", path) for seed, paths in seed_volumes.items()
              for i, path in enumerate(paths)]
    if not panels:
        return ""
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.4), squeeze=False)
    for ax, (title, path) in zip(axes[0], panels):
        v, _ = io.read_map(path)
        ax.imshow(v.sum(axis=0), cmap="gray", origin="lower")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    return _img(_png(fig), "stage maps")


def _final_particles(star, pixel_size):
    """The final particles STAR, read once for the report's three panels that show it (at
    40,000 particles a read takes over a second); a rewritten file is read again."""
    stat = os.stat(star)
    return _read_final_particles(str(star), pixel_size, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _read_final_particles(star, pixel_size, mtime_ns, size):
    return io.read_particles(star, pixel_size=pixel_size, check_stacks=False)


def particles_and_reprojections(star, preprocessed_star, volume, pixel_size, count: int) -> str:
    """Example particles (from ``preprocessed_star``, as the reconstruction saw them) next to the
    final map projected at their estimated poses (from ``star``) with their CTF."""
    from cryoday.ctf import evaluate_ctf
    from cryoday.fourier import ift2
    from cryoday.geometry import euler_to_matrix
    from cryoday.simulate import project_ft, shift_phase

    preprocessed = io.read_particles(preprocessed_star)
    final = _final_particles(star, pixel_size)
    rows = np.arange(min(count, len(preprocessed)))
    if len(rows) == 0:
        return ""
    with io.ImageSource(preprocessed) as source:
        images = source.read(rows)
    pose = io.poses(final)
    box = images.shape[-1]
    rotations = euler_to_matrix(pose["rot"][rows], pose["tilt"][rows], pose["psi"][rows])
    shifts = np.stack([pose["shift_x"][rows], pose["shift_y"][rows]], 1) / pixel_size
    k = (np.arange(box) - box // 2) / (box * pixel_size)
    fy, fx = np.meshgrid(k, k, indexing="ij")
    ctf = {key: v[rows] for key, v in io.ctf_params(preprocessed).items()}
    c = evaluate_ctf(fx, fy, **ctf)
    models = ift2(project_ft(volume, rotations) * shift_phase(box, shifts) * c)
    fig, axes = plt.subplots(2, len(rows), figsize=(1.8 * len(rows), 3.8), squeeze=False)
    for j in range(len(rows)):
        axes[0, j].imshow(images[j], cmap="gray", origin="lower")
        axes[1, j].imshow(models[j], cmap="gray", origin="lower")
        axes[0, j].set_title(f"particle {rows[j] + 1}", fontsize=8)
    axes[0, 0].set_ylabel("particle")
    axes[1, 0].set_ylabel("map x CTF at its pose")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return _img(_png(fig), "particles and reprojections")


def defocus_histogram(star, pixel_size) -> str:
    table = _final_particles(star, pixel_size).table
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(table["rlnDefocusU"] / 1e4, bins=30)
    ax.set(xlabel="defocus U (um)", ylabel="particles", title="CTF defocus")
    return _img(_png(fig), "defocus histogram")


def shift_histogram(star, pixel_size, metrics) -> str:
    """The final shifts' distances from the box centre, with the last stage's grid radius."""
    table = _final_particles(star, pixel_size).table
    if "rlnOriginXAngst" not in table:
        return ""
    r = np.hypot(table["rlnOriginXAngst"].to_numpy(), table["rlnOriginYAngst"].to_numpy())
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(r, bins=30)
    title = "final shifts"
    radius = metrics.get("shift_radius_A")
    if radius is not None:
        ax.axvline(radius, color="C3", ls="--", label=f"grid radius {radius:.1f} A")
        ax.legend()
        title += (f": prior sigma {metrics['shift_sigma_A']:.1f} A, "
                  f"{metrics['shift_edge_fraction']:.1%} at the grid's edge")
    ax.set(xlabel="|shift| (A)", ylabel="particles", title=title)
    return _img(_png(fig), "shift histogram")


# Micrograph spectra drawn at most (evenly chosen): more lines only grey the plot.
MAX_MICROGRAPH_LINES = 20


def noise_spectrum_plot(noise_tsv) -> str:
    """Each noise group's relative power against spatial frequency, and a one-line summary.

    Optics groups are drawn bold, micrograph groups as thin grey lines (at most
    ``MAX_MICROGRAPH_LINES`` of them), white noise (1) dashed. The summary gives the number of
    groups and the pooled spectrum's low-to-high power ratio
    (:func:`cryoday.validation.noise_model_figures`).

    Parameters
    ----------
    noise_tsv : path
        Preprocessing's ``noise_spectrum.tsv``.
    """
    spectrum = noise.NoiseSpectrum.load(noise_tsv)
    upto = nyquist_shell(spectrum) + 1  # the corners beyond Nyquist are not resolution
    freq = spectrum.shells[:upto]
    optics = [i for i, label in enumerate(spectrum.labels) if " / " not in label]
    micrographs = [i for i in range(spectrum.n_groups) if i not in optics]
    shown = micrographs
    if len(micrographs) > MAX_MICROGRAPH_LINES:
        shown = [micrographs[i] for i in
                 np.linspace(0, len(micrographs) - 1, MAX_MICROGRAPH_LINES).round().astype(int)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for n, i in enumerate(shown):
        ax.plot(freq, spectrum.power[i, :upto], color="0.6", lw=0.6,
                label=(f"micrographs ({len(shown)} of {len(micrographs)})" if n == 0 else None))
    for i in optics:
        ax.plot(freq, spectrum.power[i, :upto], lw=2, label=spectrum.labels[i])
    ax.axhline(1.0, color="k", ls="--", lw=0.8, label="white")
    ax.set(xlabel="spatial frequency (1/A)", ylabel="relative noise power",
           title="noise power spectrum per group")
    ax.set_ylim(bottom=0)
    top = ax.secondary_xaxis("top", functions=(lambda f: 1 / np.maximum(f, 1e-6),
                                               lambda r: 1 / np.maximum(r, 1e-6)))
    # Fixed ticks: automatic ones on a 1/f axis crowd near f = 0; kept >= 7% of the axis apart.
    ticks = []
    for r in (2, 2.5, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50, 100):
        if freq[1] <= 1 / r <= freq[-1] and all(1 / t - 1 / r >= 0.07 * freq[-1] for t in ticks):
            ticks.append(r)
    top.set_xticks(ticks, [f"{r:g}" for r in ticks])
    top.set_xlabel("resolution (A)")
    ax.legend(fontsize=7)
    ratio = pooled_low_to_high(spectrum)
    summary = (f"<p>Noise model: {spectrum.n_groups} groups ({len(optics)} optics, "
               f"{len(micrographs)} micrographs); pooled power below 1/{NOISE_LOW_BAND_A:g} A is "
               f"{ratio:.2f} x that beyond 1/{NOISE_HIGH_BAND_A:g} A (white noise: 1).</p>")
    return summary + _img(_png(fig), "noise power spectrum")


def pose_error_histogram(metrics) -> str:
    counts = metrics.get("pose_error_histogram")
    if not counts:
        return "<p>No pose errors (not a simulation).</p>"
    fig, ax = plt.subplots(figsize=(5, 3))
    edges = np.linspace(0, 180, len(counts) + 1)
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge")
    ax.set(xlabel="angular error after global alignment (degrees)", ylabel="particles",
           title=f"pose error, median {metrics['pose_error_median_deg']:.1f} degrees")
    return _img(_png(fig), "pose errors")


def signal_paragraph(metrics) -> str:
    """The held-out likelihood-ratio test of the map against empty density."""
    signal = metrics.get("heldout_signal")
    if not signal:
        return ""
    evidence = signal.get("evidence", signal["z"] >= SIGNAL_Z)
    verdict = "evidence of a structure" if evidence else "<b>no evidence of a structure</b>"
    if signal.get("reason"):
        verdict += f" ({html.escape(signal['reason'])})"
    return (f"<p>Held-out test: on {signal['n_heldout']} images never used for fitting, the map "
            f"explains the data {signal['gain_nats_per_image']:+.2f} nats per image better than "
            f"empty density (z = {signal['z']:.1f}): {verdict}.</p>")


def seed_table(metrics) -> str:
    """Pairwise FSC between the random starts' maps, and whether they agree."""
    consistency = metrics.get("seed_consistency", {})
    pairs = consistency.get("pairwise_fsc0143_A", {})
    seeds = list(metrics.get("seeds", {}))
    if not pairs:
        return (f"<p>Seed consistency: one random start (seed {metrics.get('chosen_seed')}); "
                "run two or more (<code>reconstruction: seeds</code>) to check that the "
                "answer does not depend on the start.</p>")
    rows = "".join(f"<tr><td>{html.escape(pair)}</td><td>{res:.1f}</td></tr>"
                   for pair, res in pairs.items())
    verdict = ("the maps agree" if consistency.get("agree")
               else "<b>the maps disagree: the structure is not reproducible</b>")
    criterion = ""
    if "threshold_A" in consistency:
        criterion = (f" (they agree when each pair's FSC 0.143 is within "
                     f"{consistency['max_ratio']:g} x {consistency['reference_A']:.1f} A, the "
                     f"resolution the data support: {consistency['threshold_A']:.1f} A)")
    return (f"<p>Seed consistency over seeds {', '.join(seeds)}: {verdict}{criterion}; the final "
            f"map is seed {metrics.get('chosen_seed')}'s (lowest held-out error).</p>"
            "<table><tr><th>seeds</th><th>FSC 0.143 between their maps (A)</th></tr>"
            f"{rows}</table>")


def _versions() -> str:
    import numba
    import snakemake

    return (f"cryoday {__version__}, numpy {np.__version__}, numba {numba.__version__}, "
            f"snakemake {snakemake.__version__}")


def _plain(value):
    """Snakemake's config sections (its own dict and list types) as plain ones for YAML."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _speedup(value) -> str:
    return "" if not value else f"{value:.0f}x"


def symmetry_section(metrics, volume: np.ndarray, searched: np.ndarray | None = None) -> str:
    """The point group the run used and, when a C1 map was searched, the candidates' scores
    and the map turned onto the found group's axes (RELION's: the principal axis along z, a
    two-fold along x), seen along them. ``searched`` is the map the search read (the full-box
    final map; default ``volume``)."""
    sym = metrics.get("symmetry")
    if not sym:
        return ""
    parts = ["<h2>Symmetry</h2>",
             f"<p>The run used point group <b>{html.escape(sym['group'])}</b> (order "
             f"{sym['order']})" + (": the pose grid covered one asymmetric unit, the map was kept "
                                   "symmetric, and each pose is one of its "
                                   f"{sym['order']} equivalents.</p>" if sym["order"] > 1
                                   else ".</p>")]
    if sym["order"] > 1:
        parts.append(map_views(volume, f"final map along its {sym['group']} axes "
                                       "(the n-fold along z)"))
    search = sym.get("search")
    if search:
        rows = "".join(
            f"<tr{' class=ok' if c['group'] == search['group'] else ''}><td>{c['group']}</td>"
            f"<td>{c['order']}</td><td>{c['score']:.3f}</td><td>{c['consistency']:.3f}</td>"
            f"<td>{'n/a' if c['fsc_0.143_A'] is None else c['fsc_0.143_A']}</td></tr>"
            for c in search["candidates"])
        parts += [
            (f"<p>Searched on the C1 map: <b>{html.escape(search['group'])}</b> (a group is "
             f"accepted when its consistency is within {search['tolerance']:g} of C1's "
             f"self-consistency {search['reference']:.3f}; the largest accepted group wins).</p>"),
            ("<table><tr><th>group</th><th>order</th><th>score</th><th>consistency</th>"
             "<th>symmetrised half-map FSC 0.143 (A)</th></tr>"), rows, "</table>"]
        found = next(c for c in search["candidates"] if c["group"] == search["group"])
        if found["order"] > 1:
            from cryoday.symmetry_search import align_to_recorded_axes

            aligned = align_to_recorded_axes(volume if searched is None else searched, search)
            parts.append(map_views(aligned, f"final map turned onto the {found['group']} axes "
                                            "found (the n-fold along z)"))
    return "\n".join(parts)


def final_map_section(metrics, final_map=None, final_fsc=None) -> str:
    """The final map (full box, to the data's limit): views, half-map FSC, B factor and its FSC
    against the reference beside the stage map's. Empty without a final map."""
    figures = metrics.get("final_map")
    if not figures or final_map is None:
        return ""
    volume, _ = io.read_map(final_map)

    def a(value):
        return "n/a" if value is None else f"{value:.1f} A"

    b = figures.get("sharpening_B_A2")
    rows = "".join(
        f"<tr><td>{name}</td><td>{a(m.get('fsc05_vs_reference_A'))}</td>"
        f"<td>{a(m.get('fsc0143_vs_reference_A'))}</td></tr>"
        for name, m in (("stage map (last stage's cutoff)", metrics), ("final map", figures)))
    parts = [
        "<h2>Final map</h2>",
        (f"<p>All {figures['n_particles']} particles inserted at the full box "
         f"({figures['box']} px, {figures['pixel_size']:.3f} A/px) up to Nyquist, "
         f"{'at their pose posteriors' if figures['poses'] == 'posterior' else 'at their best poses'}"
         f" ({figures['n_insertions']} insertions). Half-map FSC 0.143: "
         f"{a(figures['halfmap_fsc0143_masked_A'])} masked, "
         f"{a(figures['halfmap_fsc0143_unmasked_A'])} unmasked. Sharpening B factor "
         f"(RELION's sign): {'none (too few shells beyond 10 A)' if b is None else f'{b:.0f} A^2'}."
         "</p>"),
        ("<table><tr><th>map</th><th>FSC 0.5 vs reference</th><th>FSC 0.143 vs reference</th>"
         f"</tr>{rows}</table>"),
        map_views(volume, "final map (unsharpened)"),
    ]
    if final_fsc is not None:
        parts.append(fsc_plot(final_fsc))
    return "\n".join(parts)


def class_proportion_plot(stage_classes) -> str:
    """Each class's proportion after every SAGD iteration, the stages one after another
    (``proportion_history`` of each stage's ``classes.npz``; dashed lines between stages)."""
    histories = [records.read_classes(p)["proportion_history"] for p in stage_classes]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    offset = 0
    for index, history in enumerate(histories):
        it = offset + np.arange(1, len(history) + 1)
        for k in range(history.shape[1]):
            ax.plot(it, history[:, k], color=f"C{k}",
                    label=f"class {k + 1}" if index == 0 else None)
        offset += len(history)
        if index < len(histories) - 1:
            ax.axvline(offset + 0.5, color="gray", ls="--", lw=0.6)
    ax.set(xlabel="iteration (stages one after another)", ylabel="class proportion",
           title="class proportions over the iterations", ylim=(0, 1))
    ax.legend(fontsize=7)
    return _img(_png(fig), "class proportions")


def _resolution(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.1f} A"


def _verdict(c) -> str:
    if c["junk"] is None:
        return f"unknown ({html.escape(c['junk_reason'])})"
    return (f"<b>junk</b>: {html.escape(c['junk_reason'])}" if c["junk"]
            else html.escape(c["junk_reason"]))


def classes_section(metrics, stage_classes) -> str:
    """A run of K > 1 classes: the class table (size, proportion, held-out test, junk or not,
    resolution against the truth), the proportions over the iterations, the FSC between
    classes, a simulation's confusion table, and each class's map (central slices,
    projections, surface). Empty for one class.

    Parameters
    ----------
    metrics : dict
        ``metrics.json`` (its ``classes`` section, :func:`cryoday.class_results.class_metrics`).
    stage_classes : sequence of path
        The chosen seed's ``classes.npz`` of every stage, in order.
    """
    section = metrics.get("classes")
    if not section or not stage_classes:
        return ""
    last = records.read_classes(stage_classes[-1])
    classes = section["classes"]
    same = {}
    for pair, figures in section["agreement"]["pairs"].items():
        a, b = (int(x) for x in pair.split("-"))
        if figures["same_molecule"]:
            same.setdefault(a, []).append(b)
            same.setdefault(b, []).append(a)
    rows = "".join(
        f"<tr{' class=ok' if c['main'] else ''}><td>{c['class']}{' (main)' if c['main'] else ''}"
        f"</td><td>{c['size']}</td><td>{c['size_fraction']:.1%}</td><td>{c['proportion']:.3f}"
        f"</td><td>{_verdict(c)}</td><td>{_resolution(c.get('halfmap_fsc0143_masked_A'))}</td>"
        f"<td>{_resolution(c.get('fsc05_vs_truth_A'))} / "
        f"{_resolution(c.get('fsc0143_vs_truth_A'))}</td></tr>" for c in classes)
    junk = section.get("junk", [])
    parts = [
        "<h2>Classes</h2>",
        (f"<p>{section['n_classes']} classes (<code>reconstruction.classes</code>); the final "
         f"map is class {section['main']}'s, the one of the largest proportion. Each class's "
         "map and particles are in <code>final/class&lt;k&gt;/</code>. "
         + (f"Classes that look like junk: {', '.join(map(str, junk))}."
            if junk else "No class looks like junk.") + "</p>"),
        ("<table><tr><th>class</th><th>particles</th><th>share</th><th>proportion</th>"
         "<th>held-out test (junk: no evidence of a structure)</th>"
         "<th>half-map FSC 0.143 (masked)</th><th>FSC 0.5 / 0.143 vs truth</th></tr>"), rows,
        "</table>",
        class_proportion_plot(stage_classes),
    ]
    pair_rows = "".join(
        f"<tr><td>{pair}</td><td>{_resolution(f['fsc05_A'])}</td>"
        f"<td>{_resolution(f['fsc0143_A'])}</td>"
        f"<td>{'the same molecule' if f['same_molecule'] else 'different'}</td></tr>"
        for pair, f in section["agreement"]["pairs"].items())
    parts += [
        (f"<p>Classes compared after alignment: two classes look like the same molecule when "
         f"their FSC 0.5 is finer than {section['agreement']['threshold_A']:.1f} A "
         f"({section['agreement']['factor']:g} x the last stage's resolution, and beyond the "
         "first Fourier shells, where any two aligned maps agree).</p>"),
        ("<table><tr><th>classes</th><th>FSC 0.5</th><th>FSC 0.143</th><th>verdict</th></tr>"
         f"{pair_rows}</table>")]
    confusion = section.get("confusion")
    if confusion:
        head = "".join(f"<th>class {c['class']}</th>" for c in classes)
        body = "".join(f"<tr><td>{html.escape(kind)}</td>"
                       + "".join(f"<td>{n}</td>" for n in counts) + "</tr>"
                       for kind, counts in confusion.items())
        parts += [("<p>Simulation: each kind of particle (the molecule's map, pure noise, "
                   "another map) against its assigned class.</p>"),
                  f"<table><tr><th>truth</th>{head}</tr>{body}</table>"]
    for c in classes:
        k = c["class"]
        title = (f"class {k}" + (" (main)" if c["main"] else "")
                 + (" (junk)" if c["junk"] else ""))
        also = (f" It looks like the same molecule as class(es) "
                f"{', '.join(map(str, same[k]))}." if k in same else "")
        parts += [f"<h3>{title}</h3>",
                  (f"<p>{c['size']} particles ({c['size_fraction']:.1%}), proportion "
                   f"{c['proportion']:.3f}; {_verdict(c)}. Half-map FSC 0.143 (masked): "
                   f"{_resolution(c.get('halfmap_fsc0143_masked_A'))}; FSC 0.5 against the "
                   f"truth: {_resolution(c.get('fsc05_vs_truth_A'))}.{also}</p>"),
                  map_views(last["volumes"][k - 1], f"{title}: central slices and projections"),
                  isosurface_views(last["volumes"][k - 1], f"{title}: surface")]
    return "\n".join(parts)


def write_report(path, *, dataset, metrics, fsc, volume, star, preprocess_info,
                 preprocessed_star, seed_stages, settings, n_example_particles,
                 final_map=None, final_fsc=None, noise_spectrum=None, class_stages=None):
    """Write the report for one dataset (atomically).

    Parameters
    ----------
    path : path
        The HTML page to write.
    dataset : str
        The dataset's name.
    metrics, fsc : path
        Validation's ``metrics.json`` and FSC table.
    volume, star : path
        The final map and the particles with their final poses.
    preprocess_info, preprocessed_star : path
        Preprocessing's ``info.json`` and particles.
    seed_stages : dict
        ``{seed: [(history.tsv, volume.mrc), ...]}``, one pair per stage in stage order.
    settings : dict
        The configuration the run used, shown under Provenance.
    n_example_particles : int
        How many particles to show beside the map's projections at their poses.
    final_map, final_fsc : path, optional
        The final map (``final/map_full.mrc``) and its half-map FSC table.
    noise_spectrum : path, optional
        Preprocessing's ``noise_spectrum.tsv``, plotted under Inputs.
    class_stages : dict, optional
        ``{seed: [classes.npz of each stage, in order]}`` of a run of K > 1 classes: a section
        per class (:func:`classes_section`, the chosen seed's).
    """
    m = json.loads(Path(metrics).read_text())
    info = json.loads(Path(preprocess_info).read_text())
    vol, _ = io.read_map(volume)
    histories = {seed: [h for h, _ in stages] for seed, stages in seed_stages.items()}
    volumes = {seed: [v for _, v in stages] for seed, stages in seed_stages.items()}
    status = m.get("status", "ok")
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in m.get("warnings", []))
    stage_rows = "".join(
        f"<tr><td>{i + 1}</td><td>{s['resolution_A']:g}</td><td>{s['box']}</td>"
        f"<td>{s['iterations']}</td><td>{s['wall_s']:.1f}</td>"
        f"<td>{s['heldout_nll'] if s['heldout_nll'] is None else round(s['heldout_nll'], 3)}</td>"
        f"<td>{_speedup(s.get('is_speedup'))}</td></tr>"
        for i, s in enumerate(m["stages"]))
    resolution = m.get("fsc0143_vs_reference_A")
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>cryoday report: {html.escape(dataset)}</title>",
        ("<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
         "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
         ".ok{background:#e6f4e6}.warning{background:#fbe9d0}img{max-width:100%}</style>"),
        "</head><body>",
        f"<h1>cryoday report: {html.escape(dataset)}</h1>",
        f"<p class='{status}'><b>Status: {status}</b></p><ul>{warnings}</ul>",
        "<h2>Inputs</h2>",
        (f"<p>{info['n_particles']} particles ({info['n_heldout']} held out), box {info['box']} px,"
         f" {info['pixel_size']:.3f} A/px, contrast sign {info['contrast_sign']:+d} "
         f"(z = {info['contrast_z']:.1f}).</p>"),
        defocus_histogram(star, info["pixel_size"]),
        shift_histogram(star, info["pixel_size"], m),
        noise_spectrum_plot(noise_spectrum) if noise_spectrum else "",
        particles_and_reprojections(star, preprocessed_star, vol, info["pixel_size"],
                                    n_example_particles),
        ("<h2>Run</h2><table><tr><th>stage</th><th>resolution (A)</th><th>box</th>"
         "<th>iterations</th><th>wall (s)</th><th>held-out nll</th><th>IS speed-up</th></tr>"),
        stage_rows, "</table>", history_plot(histories),
        "<h2>Map</h2>", map_views(vol, "final map"), isosurface_views(vol, "final map"),
        "<h3>Maps of the stages</h3>", stage_maps(volumes),
        "<h2>Validation</h2>",
        (f"<p>FSC 0.143 against the reference: "
         f"{'n/a' if resolution is None else f'{resolution:.1f} A'}. "
         "</p>"), signal_paragraph(m), seed_table(m),
        (f"<p>Half-map FSC 0.143: {m.get('halfmap_fsc0143_A', float('nan')):.1f} A unmasked, "
         f"{m.get('halfmap_fsc0143_masked_A', float('nan')):.1f} A masked (the half maps share "
         "the poses found against one map, so this is an optimistic figure).</p>"),
        fsc_plot(fsc), pose_error_histogram(m),
        final_map_section(m, final_map, final_fsc),
        symmetry_section(m, vol, io.read_map(final_map)[0] if final_map else None),
        classes_section(m, {int(k): v for k, v in (class_stages or {}).items()}
                        .get(int(m.get("chosen_seed", 0)))),
        "<h2>Provenance</h2>",
        (f"<p>{_versions()}; written {datetime.now(UTC):%Y-%m-%d %H:%M UTC} on "
         f"{html.escape(platform.node())} in <code>{html.escape(os.getcwd())}</code> by "
         "<code>snakemake</code> with this configuration:</p>"),
        f"<pre>{html.escape(yaml.safe_dump(_plain(settings), sort_keys=False))}</pre>",
        "</body></html>",
    ]
    with io.atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(parts))
