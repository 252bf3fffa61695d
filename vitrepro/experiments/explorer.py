"""An explorer of stored runs for JupyterLab: pick a run (variant, seed), a layer, a head and a test image, and
see that head's attention on the image, the mean attention distance of every head (the chosen one marked)
and the run's position-embedding similarity grid (Fig. 6/7 for any run, any head).

    explore(params, runs, dataset)   # in a notebook cell: the controls, and one figure they redraw

The figure is an ordinary display output that each change of a control replaces (`DisplayHandle.update`),
so the same cell works with and without a widget front end: in JupyterLab the controls redraw it; under
papermill (no front end) the cell's output is the static figure of the default choice.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .. import analysis
from ..data import is_streamed
from . import common


def test_images(dataset: str, model: torch.nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n test images of `dataset` (a fixed random draw; streamed sets: the first n): (uint8 originals, model
    inputs in [-1, 1] at the model's resolution)."""
    from ..data import load_arrays, preprocess, stream_arrays

    if is_streamed(dataset):  # imagenet-1k: the first n test images, by streaming
        raw = stream_arrays(dataset, "test", n, size=model.img_size).images
    else:
        arrays = load_arrays(dataset, "test")
        raw = arrays.images[torch.randperm(len(arrays.labels), generator=torch.Generator().manual_seed(0))[:n]]
    return raw, preprocess(raw, model.img_size, model.in_chans)


def uniform_distance(model) -> float:
    """The mean attention distance of uniform attention on the model's patch grid (the dashed line)."""
    grid = analysis._model_grid(model)
    return analysis.uniform_attention_distance(grid, analysis._model_patch_pixels(model, grid))


def pretrain_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The pre-training runs of a results frame, one row each, in seed order (stable: the sweep's within a seed)."""
    return df[df.stage == "pretrain"].drop_duplicates("run_id").sort_values("seed", kind="stable")


def stored_runs(df: pd.DataFrame, label) -> dict[str, str]:
    """{label: run_id} of the pre-training runs of a results frame, in seed order; `label(row)` names a run."""
    return {label(r): r.run_id for r in pretrain_runs(df).itertuples()}


@dataclass
class Explorer:
    """The state behind the controls: which runs, the test images, and each loaded run's model and attention
    distances (computed once per run)."""

    params: object
    runs: dict[str, str]  # label -> run id (the first is the default choice)
    images: tuple[torch.Tensor, torch.Tensor]  # (uint8 originals, model inputs), as `test_images`
    cache: dict = field(default_factory=dict)

    def model(self, label: str):
        if label not in self.cache:
            model = common.load_run_model(self.params, self.runs[label])
            self.cache[label] = (model, analysis.model_attention_distance(model, self.images[1], batch_size=64))
        return self.cache[label]

    def shape(self, label: str) -> tuple[int, int]:
        """(layers, heads) of a run."""
        _, dist = self.model(label)
        return int(dist["layer"].max()), int(dist["head"].max()) + 1

    def figure(self, label: str, layer: int, head: int, image: int = 0):
        """The three panels for one choice (layer 1-based, head 0-based)."""
        import matplotlib.pyplot as plt

        model, dist = self.model(label)
        fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 1.3, 1.2]})
        _attention_panel(axes[0], model, self.images, layer, head, image)
        _distance_panel(axes[1], dist, layer, head, uniform_distance(model))
        sim = analysis.model_position_similarity(model)
        if sim is None:
            axes[2].axis("off")
            axes[2].text(0.5, 0.5, "no learned position embedding\n(none or relative)", ha="center", va="center")
        else:
            analysis.plot_position_similarity(sim, ax=axes[2], colorbar=False, title="position-embedding similarity")
        fig.suptitle(f"{label}: layer {layer}, head {head}, test image {image}")
        fig.tight_layout()
        plt.close(fig)  # shown through the display handle only (no second copy from the inline backend)
        return fig


def _attention_panel(ax, model, images, layer: int, head: int, image: int) -> None:
    """One head's attention on one test image: from the class token (token pooling), else the mean over queries."""
    raw, x = images
    attn = analysis.model_attention(model, x[image:image + 1])[layer - 1][0, head]  # (N, N)
    grid = analysis._model_grid(model, attn.shape[-1])
    cls = attn.shape[-1] - grid[0] * grid[1]  # 1 with a class token, 0 with GAP
    row = attn[0, cls:] if cls else attn.mean(0)
    amap = row.reshape(1, 1, *grid).float()
    up = torch.nn.functional.interpolate(amap / amap.max().clamp_min(1e-12), size=tuple(raw.shape[-2:]),
                                         mode="bilinear", align_corners=False)[0, 0]
    ax.imshow(analysis._to_display(raw[image:image + 1])[0])
    ax.imshow(up.numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
    ax.set(xticks=[], yticks=[])
    ax.set_title("attention " + ("of the class token" if cls else "(mean over patches)"), fontsize=9)


def _distance_panel(ax, dist: pd.DataFrame, layer: int, head: int, uniform: float) -> None:
    """Fig. 7 right for one run: every head's mean attention distance by layer, the chosen head ringed."""
    ax.scatter(dist.layer, dist.distance, c=dist["head"], cmap="viridis", s=22)
    chosen = dist[(dist.layer == layer) & (dist["head"] == head)]
    ax.scatter(chosen.layer, chosen.distance, s=160, facecolors="none", edgecolors="red", linewidths=2)
    ax.axhline(uniform, color="grey", ls="--", lw=1, label="uniform attention")
    ax.set(xticks=np.arange(1, int(dist.layer.max()) + 1), xlabel="layer", ylabel="mean attention distance (px)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("every head (colour: head index)", fontsize=9)


def explore(params, runs: dict[str, str], dataset: str, num_images: int = 16):
    """The explorer cell: a run / layer / head / test-image picker and one figure it redraws (`num_images` test
    images of `dataset`, also those its attention distances average over). Returns the `Explorer` and the
    control box (None, None when there is no stored run to explore, e.g. with `source="results"`)."""
    import ipywidgets as W
    from IPython.display import display

    if getattr(params, "source", "train") != "train" or not runs:
        print("The explorer needs the runs' weights: run with source='train' (the run store).")
        return None, None
    first = next(iter(runs))
    ex = Explorer(params, runs, test_images(dataset, common.load_run_model(params, runs[first]), num_images))
    layers, heads = ex.shape(first)
    run = W.Dropdown(options=list(runs), value=first, description="run")
    layer = W.IntSlider(value=1, min=1, max=layers, description="layer")
    head = W.IntSlider(value=0, min=0, max=heads - 1, description="head")
    image = W.IntSlider(value=0, min=0, max=len(ex.images[0]) - 1, description="test image")
    display(box := W.HBox([run, layer, head, image]))
    handle = display(ex.figure(first, 1, 0, 0), display_id=True)

    def redraw(_=None):
        layers, heads = ex.shape(run.value)  # another variant may have another depth or width
        layer.max, head.max = layers, heads - 1
        if handle is not None:  # None: no IPython (a dry run executes the cells in a plain process)
            handle.update(ex.figure(run.value, layer.value, head.value, image.value))

    for control in (run, layer, head, image):
        control.observe(redraw, names="value")
    return ex, box
