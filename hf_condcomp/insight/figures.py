"""Figures of an `inspect` result (matplotlib, Agg backend: no display needed): the expert load
heatmap and the per-token map, each saved as a PNG whose cell area is returned so that the picture
can be read back."""


_DPI = 100


_CELLS = (0.16, 0.22, 0.66, 0.62)  # axes box (left, bottom, width, height) as figure fractions


def _grid_figure(matrix, rows, cols, path, title, cmap, vmin, vmax, annotations=None, width_per_col=0.7, colorbar=True,
                 xlabel=None):
    """Draw `matrix` (rows x cols) as cells in an axes box at a fixed place in the figure and save a
    PNG of exactly (width, height) pixels. Returns where the cells are, so the picture can be read
    back: `cells_px` = [x0, y0, x1, y1] of the cell area in pixels, origin top-left, row 0 on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width_in = max(5.0, 1.5 + width_per_col * len(cols))
    height_in = max(2.5, 1.4 + 0.45 * len(rows))
    fig = plt.figure(figsize=(width_in, height_in), dpi=_DPI)
    left, bottom, w, h = _CELLS
    ax = fig.add_axes([left, bottom, w, h])
    im = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks(range(len(cols)), cols, rotation=60 if width_per_col > 0.5 else 0, fontsize=8,
                  ha="right" if width_per_col > 0.5 else "center")
    ax.set_title(title, fontsize=9)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=8)
    if annotations is not None:
        for (i, j), (text, color) in annotations.items():
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
    if colorbar:
        fig.colorbar(im, cax=fig.add_axes([left + w + 0.03, bottom, 0.025, h]))
    path = str(path)
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    width, height = round(width_in * _DPI), round(height_in * _DPI)
    cells = [left * width, (1 - bottom - h) * height, (left + w) * width, (1 - bottom) * height]
    return {"path": path, "width": width, "height": height, "cells_px": cells, "cmap": cmap, "vmin": vmin, "vmax": vmax}


def plot_expert_load(result: dict, path) -> dict:
    """Heatmap layers x experts of each MoE layer's share of assignments (tokens_per_expert / sum),
    cells annotated with the counts. Returns the figure info plus `matrix` (the plotted shares)."""
    layers = list(result["moe_layers"])
    if not layers:
        raise ValueError("`result` has no MoE layers: there is no expert load to plot.")
    loads = [result["moe_layers"][l]["tokens_per_expert"] for l in layers]
    num_experts = max(len(c) for c in loads)
    matrix = [[c / max(sum(counts), 1) for c in counts] + [0.0] * (num_experts - len(counts)) for counts in loads]
    notes = None
    if num_experts <= 16:
        # dark text on the light (high) end of viridis, white on the dark end
        notes = {
            (i, j): (str(c), "k" if matrix[i][j] > 0.6 * max(max(row) for row in matrix) else "w")
            for i, counts in enumerate(loads)
            for j, c in enumerate(counts)
        }
    vmax = max(max(row) for row in matrix) or 1.0
    info = _grid_figure(
        matrix,
        [f"layer {l}" for l in layers],
        [str(e) for e in range(num_experts)],
        path,
        "share of each layer's assignments per expert (cells: counts)",
        "viridis",
        0.0,
        vmax,
        notes,
        width_per_col=0.5,
        xlabel="expert",
    )
    return {**info, "matrix": matrix, "rows": layers}


def plot_token_map(sample: dict, path) -> dict | None:
    """Per-token map of the sample sentence: gated layers' executed (1) / skipped (0) decisions if
    any layer recorded them (a compute map), else the MoE layers' top-1 expert per token. None when
    the sample holds neither."""
    if sample is None:
        return None
    if sample["executed"]:
        layers, values = list(sample["executed"]), list(sample["executed"].values())
        kind, cmap, vmin, vmax, title = "compute", "Greys", 0, 1, "compute per token (black: executed, white: skipped)"
    elif sample["top1_expert"]:
        layers, values = list(sample["top1_expert"]), list(sample["top1_expert"].values())
        # tab10 has the more distinct colours; tab20 for up to 20 experts (the numbers tell beyond)
        cmap, vmax = ("tab10", 9) if max(max(row) for row in values) < 10 else ("tab20", 19)
        kind, vmin, title = "experts", 0, "router's top-1 expert per token"
    else:
        return None
    notes = None if kind == "compute" else {(i, j): (str(v), "k")
                                            for i, row in enumerate(values) for j, v in enumerate(row)}
    info = _grid_figure(values, [f"layer {l}" for l in layers], sample["tokens"], path, title, cmap, vmin, vmax, notes,
                        colorbar=False)
    return {**info, "kind": kind, "matrix": values, "rows": layers}


def save_plots(result: dict, folder) -> dict:
    """Write `expert_load.png` (MoE models) and `token_map.png` (sample sentence) into `folder`."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plots = {}
    if result["moe_layers"]:
        plots["expert_load"] = plot_expert_load(result, folder / "expert_load.png")
    token_map = plot_token_map(result.get("sample"), folder / "token_map.png")
    if token_map is not None:
        plots["token_map"] = token_map
    return plots
