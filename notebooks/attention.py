# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python (vitrepro)
#     language: python
#     name: vitrepro
# ---

# %% [markdown]
# # Inspecting the Vision Transformer (Fig. 6, Fig. 7)
#
# The principal components of the patch-embedding filters (Fig. 7 left), the cosine similarity of the
# learned position embeddings (Fig. 7 centre), the mean attention distance of every head against
# depth (Fig. 7 right) and attention rollout maps on sample images (Fig. 6), for a model this
# notebook trains, a stored run of another notebook (`model_run=`) or released weights (`pretrained=`).
# Profiles, expected outcomes and commands: `vitrepro/experiments/attention.py`.
#
#     papermill notebooks/attention.ipynb out.ipynb -p profile cpu
#     papermill notebooks/attention.ipynb out.ipynb -p source results   # redraw the committed results, no training

# %% tags=["parameters"]
profile: str = "cpu"  # smoke (seconds, digits) | cpu (minutes, Fashion-MNIST) | gpu | paper
dataset: "Optional[Union[str, dict]]" = None  # training dataset and source of sample images: a name, a local parquet folder or a dict choosing its columns, {"path": ..., "label_column": ..., "image_column": ...}; None: from the profile
model_run: "Optional[str]" = None  # analyse a stored run instead: "run:<experiment>/<run_id>"
pretrained: "Optional[str]" = None  # or released weights: "timm:vit_base_patch16_224.orig_in21k" or a local file
pretrained_model: "Optional[str]" = None  # our model name for `pretrained`, e.g. "ViT-B/16"
model: "Optional[str]" = None  # the ViT this notebook trains and analyses, e.g. "ViT-Micro/4"; None: from the profile (cpu: ViT-Nano/4, the scaling notebook's 55k runs)
num_images: "Optional[int]" = None  # test images averaged for attention distance; None: from the profile
seeds: "Optional[int]" = None  # models trained (one per seed); None: from the profile (cpu: 3)
results_dir: "Optional[str]" = None  # where tables and figures go; None: <runs_dir>/results/attention/<profile>/ (not the committed results/)
runs_dir: "Optional[str]" = None  # run store; None: the settings' ($VITREPRO_RUNS, vitrepro.toml, runs/)
device: str = "auto"  # auto | cpu | cuda | cuda:N
force: bool = False  # retrain even where the run store holds a finished run
allow_partial: bool = False  # True: write tables from the runs that finished when some failed (marked partial)
dry_run: bool = False  # True: every configuration of the profile a couple of steps on stand-in data (temporary run store)
launcher: str = "local"  # local | torchrun: each configuration under torchrun --standalone (DDP), same run store
nproc_per_node: "Optional[int]" = None  # torchrun processes per configuration; None: all visible GPUs (CPU: 1)
tiny: bool = False  # with dry_run: models above 25 M parameters swapped for tiny ones of the same family
source: str = "train"  # train: the run store, training what is missing | results: redraw every table, figure and verdict from results/<notebook>/results.csv and the analysis tables beside it (no run store, no training) | a path to a results.csv or its folder

# %%
import pandas as pd

from vitrepro.experiments import attention, common

params = attention.validate_params(dict(globals()))
params

# %%
df = attention.run(params)  # source="results": read from the results file instead, training nothing
df.head()

# %%
analysed, figures, extra = attention.analyse(params, df)  # extra: the figures' data, written beside results.csv
analysed.head()

# %% [markdown]
# The same measurements at every stored snapshot of the runs: is the structure emerging over training?

# %%
tracked, tracked_figures = attention.over_training(params, df)
figures.update(tracked_figures)
analysed = pd.concat([analysed, tracked.assign(notebook="attention", profile=params.profile, stage="over_training")],
                     ignore_index=True)

# %%
tables = attention.tables(df, analysed)
for title, table in tables.items():
    print(title)
    display(table)

# %% [markdown]
# ## Explorer
#
# Pick a stored run, a layer, a head and a test image: the head's attention on the image, every head's mean
# attention distance (the chosen one ringed) and the run's position-embedding similarity. In JupyterLab the
# controls redraw the figure; run headless (papermill) this cell leaves the figure of the default choice.

# %%
from vitrepro.experiments import explorer

explored = explorer.explore(params, explorer.stored_runs(df, lambda r: f"{r.model}, seed {int(r.seed)}"),
                            attention.profile(params).dataset)

# %%
written = common.write_results(common.results_dir(params, "attention"), pd.concat([df, analysed], ignore_index=True),
                               tables, figures, notes=f"Profile `{params.profile}`.", analysis=extra)
[str(p) for p in written]
