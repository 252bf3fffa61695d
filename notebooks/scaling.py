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
# # Scaling: accuracy against pre-training data size and compute (Fig. 3, Fig. 4, Fig. 5)
#
# Reproduces, at the scale of the chosen profile, the paper's scaling study
# (Dosovitskiy et al., ICLR 2021, §4.3-4.4, Fig. 3-5): ViTs, BiT ResNets and hybrids pre-trained on
# class-balanced subsets of an upstream set spanning 30x, measured by fine-tuning (Fig. 3) and by
# the 5-shot linear probe (Fig. 4) on a downstream set, and against pre-training compute (Fig. 5).
# Profiles, expected outcomes and commands: `vitrepro/experiments/scaling.py`.
#
#     papermill notebooks/scaling.ipynb out.ipynb -p profile cpu

# %% tags=["parameters"]
profile = "cpu"  # smoke (seconds, digits) | cpu (minutes, Fashion-MNIST -> MNIST) | gpu | paper
upstream = None  # pre-training dataset name or local parquet folder; None: from the profile
downstream = None  # transfer dataset for the 5-shot probe and fine-tuning; None: from the profile
seeds = None  # seeds per point; None: from the profile (cpu: 2)
results_dir = None  # where tables and figures go; None: results/scaling/
runs_dir = None  # run store; None: $VITREPRO_RUNS or runs/
device = "auto"  # auto | cpu | cuda | cuda:N
force = False  # retrain even where the run store holds a finished run

# %%
from vitrepro.experiments import common, scaling

params = scaling.validate_params(dict(globals()))
params

# %%
df = scaling.run(params)
df.head()

# %%
tables = scaling.tables(df)
for title, table in tables.items():
    print(title)
    display(table)

# %%
figures = scaling.figures(df)

# %%
written = common.write_results(common.results_dir(params, "scaling"), df, tables, figures,
                               notes=f"Profile `{params.profile}`. Values: mean ± std over seeds.")
[str(p) for p in written]
