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
# # Position embeddings (Appendix D.4, Table 8; Fig. 7 centre) and class token vs GAP (Appendix D.3)
#
# Every defined combination of position embedding (`none`, `1-D`, `2-D`, `relative`) and placement
# (`stem`, `every_layer`, `every_layer_shared`), several seeds; the 5-shot linear probe as in Table 8,
# top-1 on the test split, the cosine similarity of the learned embeddings (Fig. 7 centre), and the
# class token against global average pooling at two learning rates each (App. D.3).
# Profiles, expected outcomes and commands: `vitrepro/experiments/position_embeddings.py`.
#
#     papermill notebooks/position_embeddings.ipynb out.ipynb -p profile cpu

# %% tags=["parameters"]
profile: str = "cpu"  # smoke (seconds, digits) | cpu (minutes, Fashion-MNIST) | gpu | paper
dataset: "Optional[Union[str, dict]]" = None  # training dataset name or local parquet folder, or a dict choosing its columns: {"path": ..., "label_column": "fine_label", "image_column": ...} (also "train_split", "test_split"); None: from the profile
fewshot_dataset: "Optional[Union[str, dict]]" = None  # dataset of the 5-shot linear probe (name, folder or dict as for dataset); None: from the profile
seeds: "Optional[int]" = None  # seeds per variant; None: from the profile (cpu: 3)
results_dir: "Optional[str]" = None  # where tables and figures go; None: <runs_dir>/results/position_embeddings/<profile>/ (not the committed results/)
runs_dir: "Optional[str]" = None  # run store; None: the settings' ($VITREPRO_RUNS, vitrepro.toml, runs/)
device: str = "auto"  # auto | cpu | cuda | cuda:N
force: bool = False  # retrain even where the run store holds a finished run
allow_partial: bool = False  # True: write tables from the runs that finished when some failed (marked partial)
dry_run: bool = False  # True: every configuration of the profile a couple of steps on stand-in data (temporary run store)
launcher: str = "local"  # local | torchrun: each configuration under torchrun --standalone (DDP), same run store
nproc_per_node: "Optional[int]" = None  # torchrun processes per configuration; None: all visible GPUs (CPU: 1)
tiny: bool = False  # with dry_run: models above 25 M parameters swapped for tiny ones of the same family

# %%
from vitrepro.experiments import common, position_embeddings as pe

params = pe.validate_params(dict(globals()))
params

# %%
df = pe.run(params)
df.head()

# %%
tables = pe.tables(df)
for title, table in tables.items():
    print(title)
    display(table)

# %%
figures = pe.figures(df)
figures.update(pe.similarity_figures(params, df))

# %%
written = common.write_results(common.results_dir(params, "position_embeddings"), df, tables, figures,
                               notes=f"Profile `{params.profile}`. Values: mean ± std over seeds.")
[str(p) for p in written]
