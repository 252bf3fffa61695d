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
#     papermill notebooks/position_embeddings.ipynb out.ipynb -p pos_embeds '["1d", "2d"]' -p placements '["stem"]' \
#         -p seeds 3 -p train_examples 1800   # only 1-D against 2-D (and D.3's token vs GAP)
#     papermill notebooks/position_embeddings.ipynb out.ipynb -p source results   # redraw the committed results

# %% tags=["parameters"]
profile: str = "cpu"  # smoke (seconds, digits) | cpu (minutes, Fashion-MNIST) | gpu | paper
dataset: "Optional[Union[str, dict]]" = None  # training dataset name or local parquet folder, or a dict choosing its columns: {"path": ..., "label_column": "fine_label", "image_column": ...} (also "train_split", "test_split"); None: from the profile
fewshot_dataset: "Optional[Union[str, dict]]" = None  # dataset of the 5-shot linear probe (name, folder or dict as for dataset); None: from the profile
model: "Optional[str]" = None  # the ViT of every run, e.g. "ViT-Micro/4"; None: from the profile (cpu: ViT-Nano/4)
pos_embeds: "Optional[list]" = None  # position embeddings, a subset of ["none", "1d", "2d", "relative"]; None: all four
placements: "Optional[list]" = None  # where they are added, a subset of ["stem", "every_layer", "every_layer_shared"] ("none", "relative": stem only); None: all three
poolings: "Optional[list]" = None  # App. D.3: poolings compared, a subset of ["token", "gap"]; ["token"]: Table 8's grid only, no D.3 runs; None: both
train_examples: "Optional[int]" = None  # Table 8's pre-training examples (class-balanced subset); None: from the profile (cpu: 5,500; D.3 keeps its own 1,800)
steps: "Optional[int]" = None  # pre-training budget: steps per run; None: the profile's schedule (cpu: 30 passes over the subset, at most 8 epochs of 55k)
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
source: str = "train"  # train: the run store, training what is missing | results: redraw every table, figure and verdict from results/<notebook>/results.csv (no run store, no training) | a path to a results.csv or its folder

# %%
from vitrepro import verdicts
from vitrepro.experiments import common, position_embeddings as pe

params = pe.validate_params(dict(globals()))
params

# %%
df = pe.run(params)  # source="results": read from the results file instead, training nothing
df.head()

# %%
tables = pe.tables(df)
for title, table in tables.items():
    print(title)
    display(table)

# %% [markdown]
# Every pair of the variants this run trained: the difference A - B in percentage points, its 90% interval,
# the one-sided Welch p-value, and a verdict under REPORT.md's rules (a difference at 5%, "alike" when the
# interval lies within ±1 pp, invalid when a model is below the pixel baseline of the same split).

# %%
comparisons = verdicts.position_embedding_pairs(df)
tables.update(comparisons)
for title, table in comparisons.items():
    print(title)
    display(table)

# %%
figures = pe.figures(df)
similarity = pe.similarity_tables(params, df)  # Fig. 7 centre's grids: from the runs' weights, or similarity.csv
figures.update(pe.similarity_figures(similarity))

# %% [markdown]
# ## Explorer
#
# Pick a stored run, a layer, a head and a test image: the head's attention on the image, every head's mean
# attention distance (the chosen one ringed) and the run's position-embedding similarity. In JupyterLab the
# controls redraw the figure; run headless (papermill) this cell leaves the figure of the default choice.

# %%
from vitrepro.experiments import explorer

explored = explorer.explore(params, explorer.stored_runs(pe.table8_runs(df), pe.run_label), pe.profile(params).dataset)

# %%
written = common.write_results(common.results_dir(params, "position_embeddings"), df, tables, figures,
                               notes=f"Profile `{params.profile}`. Values: mean ± std over seeds.",
                               analysis=similarity)
[str(p) for p in written]
