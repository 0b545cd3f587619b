"""The run's HTML report: one self-contained page (images embedded), readable offline."""

from __future__ import annotations

import base64
import csv
import html
import io as _io
import json
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from cryoday import __version__, io  # noqa: E402
from cryoday.validation import read_history  # noqa: E402


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


def history_plot(histories: list[str]) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    offset = 0
    for path in histories:
        rows = read_history(path)
        it = np.array([r["iteration"] for r in rows]) + offset
        held = np.array([r["heldout_nll"] for r in rows])
        label = Path(path).parent.name
        good = np.isfinite(held)
        axes[0].plot(it[good], held[good], "o-", label=label)
        axes[1].plot(it, [r["objective"] for r in rows], label=label)
        evaluated = np.array([r["n_evaluated"] / r["n_full"] for r in rows])
        axes[2].semilogy(it, evaluated, label=label)
        offset = it[-1] if len(it) else offset
    axes[0].set(xlabel="iteration", ylabel="held-out mean -log p(I|V)", title="held-out error")
    axes[1].set(xlabel="iteration", ylabel="objective (mean -log posterior)", title="objective")
    axes[2].set(xlabel="iteration", ylabel="fraction of the grid evaluated",
                title="importance sampling")
    axes[0].legend(fontsize=7)
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


def _speedup(value) -> str:
    return "" if not value else f"{value:.0f}x"


def write_report(path, dataset, metrics, fsc, volume, star, preprocess_info, histories, config):
    """Write the report for one dataset (atomically)."""
    m = json.loads(Path(metrics).read_text())
    info = json.loads(Path(preprocess_info).read_text())
    vol, _ = io.read_map(volume)
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
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
        ".ok{background:#e6f4e6}.warning{background:#fbe9d0}img{max-width:100%}</style>",
        "</head><body>",
        f"<h1>cryoday report: {html.escape(dataset)}</h1>",
        f"<p class='{status}'><b>Status: {status}</b></p><ul>{warnings}</ul>",
        "<h2>Inputs</h2>",
        f"<p>{info['n_particles']} particles ({info['n_heldout']} held out), box {info['box']} px,"
        f" {info['pixel_size']:.3f} A/px, contrast sign {info['contrast_sign']:+d} "
        f"(z = {info['contrast_z']:.1f}).</p>",
        "<h2>Run</h2><table><tr><th>stage</th><th>resolution (A)</th><th>box</th>"
        "<th>iterations</th><th>wall (s)</th><th>held-out nll</th><th>IS speed-up</th></tr>",
        stage_rows, "</table>", history_plot(histories),
        "<h2>Map</h2>", map_views(vol, "final map"),
        "<h2>Validation</h2>",
        f"<p>FSC 0.143 against the reference: "
        f"{'n/a' if resolution is None else f'{resolution:.1f} A'}. "
        f"Seed consistency: {html.escape(json.dumps(m.get('seed_consistency', {})))}</p>",
        fsc_plot(fsc),
        "<h2>Provenance</h2>",
        f"<p>cryoday {__version__}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}</p>",
        f"<pre>{html.escape(yaml.safe_dump(dict(config), sort_keys=False))}</pre>",
        "</body></html>",
    ]
    with io.atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(parts))
