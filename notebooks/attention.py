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
#     display_name: Python 3
#     language: python
#     name: python3
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

# %% tags=["parameters"]
profile = "cpu"  # smoke (seconds, digits) | cpu (minutes, Fashion-MNIST) | gpu | paper
dataset = None  # training dataset and source of sample images; None: from the profile
model_run = None  # analyse a stored run instead: "run:<experiment>/<run_id>"
pretrained = None  # or released weights: "timm:vit_base_patch16_224.orig_in21k" or a local file
pretrained_model = None  # our model name for `pretrained`, e.g. "ViT-B/16"
num_images = None  # test images averaged for attention distance; None: from the profile
seeds = None  # models trained (one per seed); None: from the profile (cpu: 2)
results_dir = None  # where tables and figures go; None: results/attention/
runs_dir = None  # run store; None: $VITREPRO_RUNS or runs/
device = "auto"  # auto | cpu | cuda | cuda:N
force = False  # retrain even where the run store holds a finished run

# %%
from vitrepro.experiments import attention, common

params = attention.validate_params(dict(globals()))
params

# %%
df = attention.run(params)
df.head()

# %%
analysed, figures = attention.analyse(params, df)
analysed.head()

# %%
tables = attention.tables(df, analysed)
for title, table in tables.items():
    print(title)
    display(table)

# %%
import pandas as pd

written = common.write_results(common.results_dir(params, "attention"), pd.concat([df, analysed], ignore_index=True),
                               tables, figures, notes=f"Profile `{params.profile}`.")
[str(p) for p in written]
