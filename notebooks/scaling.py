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
# # Scaling: accuracy against pre-training data size and compute (Fig. 3, Fig. 4, Fig. 5)
#
# Reproduces, at the scale of the chosen profile, the paper's scaling study
# (Dosovitskiy et al., ICLR 2021, §4.3-4.4, Fig. 3-5): ViTs, BiT ResNets and hybrids pre-trained on
# class-balanced subsets of an upstream set spanning 30x, measured by fine-tuning (Fig. 3) and by
# the 5-shot linear probe (Fig. 4) on a downstream set, and against pre-training compute (Fig. 5).
# Profiles, expected outcomes and commands: `vitrepro/experiments/scaling.py`.
#
#     papermill notebooks/scaling.ipynb out.ipynb -p profile cpu
#     papermill notebooks/scaling.ipynb out.ipynb -p profile smoke -p models '["ViT-Nano/4", "R14x0.25+ViT-Nano/4"]'
#     papermill notebooks/scaling.ipynb out.ipynb -p source results   # redraw the committed results, no training

# %% tags=["parameters"]
profile: str = "cpu"  # smoke (seconds, digits) | cpu (minutes, Fashion-MNIST -> MNIST) | gpu | paper
upstream: "Optional[Union[str, dict]]" = None  # pre-training dataset name or local parquet folder, or a dict choosing its columns: {"path": ..., "label_column": "fine_label", "image_column": ...} (also "train_split", "test_split"); None: from the profile
downstream: "Optional[Union[str, dict]]" = None  # transfer dataset for the 5-shot probe and fine-tuning (name, folder or dict as for upstream); None: from the profile
sizes: "Optional[list]" = None  # pre-training subset sizes, positive ints, e.g. [1000, 3000, 10000] (checked against the upstream set before any run); None: from the profile
models: "Optional[list]" = None  # models, any name of the registry's grammar, e.g. ["ViT-Nano/4", "R14x0.25+ViT-Nano/4", "BiT-R14x0.25"]; None: from the profile (cpu: ViT-Nano/4, BiT-R14x0.25)
steps: "Optional[int]" = None  # pre-training budget: steps per run (batch of the profile's recipe); None: the profile's schedule (cpu: 8 epochs of 55k, at most 30 passes over a subset)
seeds: "Optional[int]" = None  # seeds per point; None: from the profile (cpu: 3)
results_dir: "Optional[str]" = None  # where tables and figures go; None: <runs_dir>/results/scaling/<profile>/ (not the committed results/)
runs_dir: "Optional[str]" = None  # run store; None: the settings' ($VITREPRO_RUNS, vitrepro.toml, runs/)
device: str = "auto"  # auto | cpu | cuda | cuda:N
force: bool = False  # retrain even where the run store holds a finished run
allow_partial: bool = False  # True: write tables from the runs that finished when some failed (marked partial)
dry_run: bool = False  # True: every configuration of the profile a couple of steps on stand-in data (temporary run store)
launcher: str = "local"  # local | torchrun: each configuration under torchrun --standalone (DDP), same run store
nproc_per_node: "Optional[int]" = None  # torchrun processes per configuration; None: all visible GPUs (CPU: 1)
tiny: bool = False  # with dry_run: models above 25 M parameters swapped for tiny ones of the same family
source: str = "train"  # train: the run store, training what is missing | results: redraw every table, figure and verdict from results/<notebook>/results.csv (no run store, no training) | a path to a results.csv or its folder

# %%
from vitrepro import verdicts
from vitrepro.experiments import common, scaling

params = scaling.validate_params(dict(globals()))
params

# %%
df = scaling.run(params)  # source="results": read from the results file instead, training nothing
df.head()

# %%
tables = scaling.tables(df)
tables.update(verdicts.scaling_pairs(df))  # every pair of the models trained, per pre-training size
for title, table in tables.items():
    print(title)
    display(table)

# %%
figures = scaling.figures(df)

# %%
written = common.write_results(common.results_dir(params, "scaling"), df, tables, figures,
                               notes=f"Profile `{params.profile}`. Values: mean ± std over seeds.")
[str(p) for p in written]
