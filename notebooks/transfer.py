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
# # Transfer: pre-training upstream, fine-tuning downstream (Table 2, Appendix Table 5)
#
# Each model is pre-trained on a small and a large upstream set (the paper's ImageNet vs ImageNet-21k)
# and fine-tuned on every downstream set at the pre-training resolution and at a higher one (position
# embeddings interpolated in 2-D), beside a from-scratch row. With `pretrained=` the paper's released
# weights are fine-tuned with its recipe instead (SGD momentum, batch 512, 384 px).
# Profiles, expected outcomes and commands: `vitrepro/experiments/transfer.py`.
#
#     papermill notebooks/transfer.ipynb out.ipynb -p profile cpu
#     papermill notebooks/transfer.ipynb out.ipynb -p source results   # redraw the committed results, no training

# %% tags=["parameters"]
profile: str = "cpu"  # smoke (seconds, digits) | cpu (minutes, Fashion-MNIST -> MNIST, MNIST-1k) | gpu | paper
upstream: "Optional[Union[str, dict]]" = None  # pre-training dataset name or local parquet folder, or a dict choosing its columns: {"path": ..., "label_column": "fine_label", "image_column": ...} (also "train_split", "test_split"); None: from the profile
downstream: "Optional[list]" = None  # list of downstream datasets (names, folders or dicts as for upstream); None: from the profile
pretrained: "Optional[str]" = None  # released weights to fine-tune instead, e.g. "timm:vit_base_patch16_224.orig_in21k" or a file
pretrained_model: "Optional[str]" = None  # our model name for a local `pretrained` file, e.g. "ViT-B/16"
models: "Optional[list]" = None  # models, any name of the registry's grammar, e.g. ["ViT-Nano/4", "BiT-R14x0.25"]; None: from the profile
upstream_sizes: "Optional[list]" = None  # upstream subset sizes, positive ints, e.g. [5500, 55000] (the paper's ImageNet vs ImageNet-21k); None: from the profile (cpu: 5.5k and all 55k)
finetune_sizes: "Optional[list]" = None  # fine-tuning resolutions in px, e.g. [28, 36]; None: from the profile (cpu: 28, plus its 16 -> 16/28 px design)
scratch: "Optional[bool]" = None  # train the from-scratch rows; None: from the profile (yes)
seeds: "Optional[int]" = None  # seeds per cell; None: from the profile (cpu: 3)
results_dir: "Optional[str]" = None  # where tables and figures go; None: <runs_dir>/results/transfer/<profile>/ (not the committed results/)
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
from vitrepro.experiments import common, transfer

params = transfer.validate_params(dict(globals()))
params

# %%
df = transfer.run(params)  # source="results": read from the results file instead, training nothing
df.head()

# %%
tables = transfer.tables(df)
for title, table in tables.items():
    print(title)
    display(table)

# %%
figures = transfer.figures(df)

# %%
written = common.write_results(common.results_dir(params, "transfer"), df, tables, figures,
                               notes=f"Profile `{params.profile}`. Values: mean ± std over seeds.")
[str(p) for p in written]
