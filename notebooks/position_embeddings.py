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
profile = "cpu"  # smoke (seconds, digits) | cpu (minutes, Fashion-MNIST) | gpu | paper
dataset = None  # training dataset name or local parquet folder; None: from the profile
fewshot_dataset = None  # dataset of the 5-shot linear probe; None: from the profile
seeds = None  # seeds per variant; None: from the profile (cpu: 2)
results_dir = None  # where tables and figures go; None: results/position_embeddings/
runs_dir = None  # run store; None: $VITREPRO_RUNS or runs/
device = "auto"  # auto | cpu | cuda | cuda:N
force = False  # retrain even where the run store holds a finished run

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
