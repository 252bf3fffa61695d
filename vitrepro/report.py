"""The paper's numbers beside ours, and a verdict per claim: `results/REPORT.md`.

    python -m vitrepro.report            # rebuild results/REPORT.md from results/<notebook>/results.csv
    python -m vitrepro.report --export   # first re-export each notebook's CSV from the run store
    python -m vitrepro.report --redraw   # first redraw every notebook's tables.md and figures (`make figures`)

The report reads only each notebook's long-form `results.csv` (columns: `experiments.results.SCHEMA`) and the paper's numbers
(`paper_numbers.csv` in this package, each row with its source), so it rebuilds on a machine that never
trained anything. Each claim is judged by `vitrepro.verdicts`; one that does not reproduce at this scale is
reported as such, never forced.
"""
from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

import pandas as pd

from .experiments import NOTEBOOKS
from .experiments.params import REPO_ROOT
from .experiments.results import atomic_write_text
from . import stats
from .verdicts import VERDICTS, Verdict, correct, gap_table, position_embedding_pairs, scaling_pairs


def paper_numbers() -> pd.DataFrame:
    """The paper's numbers with their sources ([P] = arXiv 2010.11929; see docs/paper-numbers)."""
    with resources.files("vitrepro").joinpath("paper_numbers.csv").open() as f:
        return pd.read_csv(f)


# ------------------------------------------------------------------------------------ report
SECTIONS = {
    "scaling": ("Scaling: data size and compute (Fig. 3, Fig. 4, Fig. 5)", ["Table 5", "Table 1"]),
    "position_embeddings": ("Position embeddings and pooling (App. D.4 Table 8, D.3, Fig. 7 centre)", ["Table 8"]),
    "transfer": ("Transfer (Table 2, App. Table 5)", ["Table 2", "Table 5"]),
    "attention": ("Inspecting ViT (Fig. 6, Fig. 7)", []),
}


def load_results(results: Path) -> dict[str, pd.DataFrame]:
    return {nb: pd.read_csv(f) for nb in NOTEBOOKS if (f := Path(results) / nb / "results.csv").exists()}


def _p(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _verdict_cell(v: Verdict) -> str:
    return f"**{v.verdict}**" + (f" ⚑ {v.flag}" if v.flag else "")


def verdict_table(verdicts: list[Verdict]) -> str:
    lines = ["| claim (paper) | source | verdict | p raw | p adj. | evidence (per-seed mean ± std, test statistic) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {v.claim} | {v.source} | {_verdict_cell(v)} | {_p(v.p)} | {_p(v.p_adj)} | {v.evidence} |"
              for v in verdicts]
    return "\n".join(lines)


def all_verdicts(frames: dict[str, pd.DataFrame]) -> dict[str, list[Verdict]]:
    """Every notebook's verdicts, corrected together (`verdicts.correct`): the summary table is one family."""
    raw = [(nb, v) for nb in NOTEBOOKS if nb in frames for v in VERDICTS[nb](frames[nb])]
    out: dict[str, list[Verdict]] = {nb: [] for nb in NOTEBOOKS if nb in frames}
    for (nb, _), v in zip(raw, correct([v for _, v in raw])):
        out[nb].append(v)
    return out


def build_report(results: Path) -> str:
    frames = load_results(results)
    paper = paper_numbers()
    parts = ["# vitrepro report: our runs beside the paper", "",
             "Rebuilt by `python -m vitrepro.report` from `results/<notebook>/results.csv` (exported from the run store).",
             "Paper numbers come from `vitrepro/paper_numbers.csv`; `[P]` = Dosovitskiy et al., ICLR 2021 (arXiv 2010.11929).",
             "Our runs are CPU-scale stand-ins (Fashion-MNIST / MNIST / MNIST-1k, tiny models), so only the",
             "paper's qualitative claims can be compared; absolute numbers are not comparable.", ""]
    verdicts = all_verdicts(frames)
    parts += _summary(results, verdicts)
    for nb, (title, tables) in SECTIONS.items():
        parts += [f"## {title}", ""]
        df = frames.get(nb)
        if df is None:
            parts += ["_Not run yet: no results file._", ""]
            continue
        profiles = ", ".join(sorted(df["profile"].dropna().unique())) if "profile" in df else "?"
        parts += [f"Notebook `notebooks/{nb}.ipynb`, profile(s): {profiles}; "
                  f"{df['run_id'].nunique() if 'run_id' in df else 0} runs. Tables: `results/{nb}/tables.md`.", ""]
        parts += [_data_note(df), "", "### Claims", "", verdict_table(verdicts[nb]), ""]
        if nb == "scaling":
            probes = [(m, "pretrain", f"{m.removeprefix('fewshot')}-shot") for m in ("fewshot5", "fewshot10", "fewshot25")]
            for metric, stage, label in probes + [("top1", "finetune", "fine-tuned")]:
                gaps = gap_table(df, metric, stage)
                if len(gaps):
                    parts += [f"### ViT - ResNet gap against pre-training data ({label}, Fig. 3/4 trend)", "",
                              gaps.to_markdown(index=False), ""]
        ours = results / nb / "tables.md"
        if ours.exists():
            parts += ["### Our numbers", "", ours.read_text().strip(), ""]
        for t in tables:
            p = paper[paper.table == t]
            if len(p):
                parts += [f"### The paper's {t}", "", _paper_table(t, p), ""]
        for png in sorted((results / nb).glob("*.png")):
            parts += [f"![{png.stem}]({nb}/{png.name})", ""]
    return "\n".join(parts)


RULES = ("Verdicts follow rules fixed before the run (`vitrepro/stats.py`): one-sided Welch t-tests on independent "
         "runs, paired t-tests where the design pairs (two layers of one model, two fine-tunes of one parent), the "
         "four-group interaction contrast (Welch-Satterthwaite df) for \"gains more\", and equivalence (the 90 % "
         "interval inside ±1 pp: alike; wholly outside: not alike) for \"alike\"; each side at 5 %. A claim of several "
         "comparisons holds if all do (largest p) and is refuted if any reverses (smallest p times their number). "
         f"\"p raw\" is the claim's deciding one-sided p; \"p adj.\" is {stats.CORRECTION}-adjusted across every tested "
         "claim of this table, and the verdict is decided on it (\"before correction\" shows the raw decision). "
         "⚑ flags a claim resting on a model below its pixel baseline; it keeps its verdict. Rules without a test "
         "(p \"-\") stay outside the correction.")


def _data_note(df: pd.DataFrame) -> str:
    """Whether each model seed drew its own training subset, and how many shot draws a few-shot value
    averages: a verdict on one fixed subset is conditional on it, and the report says so."""
    models = df[df.stage.isin(["pretrain", "finetune", "scratch"])] if "stage" in df else df
    if "data_seed" not in models or models.data_seed.isna().all():
        data = ("the training subset of each run is not recorded in this results.csv (exported before the "
                "`data_seed` column): treat every verdict as conditional on one subset")
    else:
        pre = models[models.stage == "pretrain"] if (models.stage == "pretrain").any() else models
        fixed = (pre.data_seed != pre.seed).any() and pre.data_seed.nunique() == 1
        data = (f"every seed trains on the same subset (data_seed {int(pre.data_seed.iloc[0])}): each verdict is "
                "conditional on that one subset" if fixed else "each seed draws its own subset (data_seed = seed)")
    draws = models.loc[models.metric.astype(str).str.startswith("fewshot"), "shot_draws"] if "shot_draws" in models else None
    shots = (f"; each few-shot value averages {int(draws.max())} shot draws" if draws is not None and draws.notna().any()
             else "")
    return f"Data: {data}{shots}."


def _summary(results: Path, verdicts: dict[str, list[Verdict]]) -> list[str]:
    """Every claim's verdict in one table, and each notebook's wall time where run_all recorded it."""
    lines = ["## Summary", "", RULES, "",
             "| notebook | claim (paper) | verdict | p raw | p adj. | before correction |", "|---|---|---|---|---|---|"]
    for nb, vs in verdicts.items():
        lines += [f"| `{nb}` | {v.claim} | {_verdict_cell(v)} | {_p(v.p)} | {_p(v.p_adj)} | {v.raw_verdict or v.verdict} |"
                  for v in vs]
    flat = [v for vs in verdicts.values() for v in vs]
    decided = [v for v in flat if v.verdict in ("reproduced", "not reproduced")]
    lines += ["", f"{len(decided)} of {len(flat)} claims reach a decision ({sum(not v.flag for v in decided)} of them "
                  f"on models above their pixel baselines); {sum(v.tested for v in flat)} are tested and corrected together.", ""]
    for f in sorted(results.glob("timings_*.json")):
        t = json.loads(f.read_text())
        steps = [k for k in t if k not in NOTEBOOKS] + [nb for nb in NOTEBOOKS if nb in t]  # the sweep, then each notebook
        times = ", ".join(f"{k} {t[k]:,.0f} s" for k in steps)
        lines += [f"Wall times, profile `{f.stem.removeprefix('timings_')}` (`{f.name}`, written by "
                  f"`python -m vitrepro.experiments.run_all`): {times}; {sum(t.values()) / 60:.1f} min in all.", ""]
    return lines


def _paper_table(table: str, p: pd.DataFrame) -> str:
    src = "; ".join(sorted(p["source"].unique()))
    if table in ("Table 5", "Table 2"):
        wide = p.pivot_table(index=["upstream", "dataset"], columns="model", values="value", aggfunc="first").reset_index()
    elif table == "Table 8":
        q = p.assign(pos_embed=p.setting.str.extract(r"pos_embed=([^;]+)", expand=False),
                     at=p.setting.str.extract(r"pos_embed_at=([^;]+)", expand=False))
        wide = q.pivot_table(index="pos_embed", columns="at", values="value", aggfunc="first").reset_index()
    else:
        wide = p[["model", "upstream", "dataset", "setting", "value"]]
    return wide.to_markdown(index=False) + f"\n\nSource: {src}."


# ------------------------------------------------------------------------------------ redraw
def redraw_outputs(nb: str, csv: Path) -> tuple[dict, dict, str]:
    """(tables, figures, notes) of notebook `nb` rebuilt from a results.csv and the analysis tables beside it,
    as the notebook's own cells build them with `source=<that file>`: no run store, no training."""
    from .experiments import module

    mod = module(nb)
    frame = pd.read_csv(csv)
    profile = str(frame.profile.dropna().iloc[0]) if frame.profile.notna().any() else "cpu"
    params = mod.validate_params(dict(profile=profile, source=str(csv)))
    df = mod.run(params)
    if nb == "attention":
        analysed, figures, _ = mod.analyse(params, df)
        tracked, tracked_figures = mod.over_training(params, df)
        analysed = pd.concat([analysed, tracked], ignore_index=True)
        return mod.tables(df, analysed), {**figures, **tracked_figures}, f"Profile `{profile}`."
    tables, figures = mod.tables(df), mod.figures(df)
    if nb == "scaling":
        tables.update(scaling_pairs(df))
    if nb == "position_embeddings":
        tables.update(position_embedding_pairs(df))
        figures.update(mod.similarity_figures(mod.similarity_tables(params, df)))
    return tables, figures, f"Profile `{profile}`. Values: mean ± std over seeds."


def redraw(results: Path) -> list[Path]:
    """Every notebook's tables.md and figures under `results/` rebuilt from its committed CSVs (`make figures`);
    results.csv and the analysis tables are read, never written. A figure whose data is not committed (one
    drawn from model weights before its table was written) is left as it is."""
    import matplotlib

    from .experiments.results import write_results

    matplotlib.use("Agg")
    written = []
    for nb, frame in load_results(results).items():
        tables, figures, notes = redraw_outputs(nb, Path(results) / nb / "results.csv")
        written += write_results(Path(results) / nb, frame, tables, figures, notes=notes, redraw=True)
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(REPO_ROOT / "results"))
    ap.add_argument("--export", action="store_true", help="re-export results CSVs from the run store first")
    ap.add_argument("--redraw", action="store_true",
                    help="first rebuild every notebook's tables.md and figures from its CSVs (no run store)")
    args = ap.parse_args(argv)
    if args.export:
        from .experiments import export_all
        export_all(Path(args.results))
    if args.redraw:
        print(f"redrew {len(redraw(Path(args.results)))} files under {args.results}")
    text = build_report(Path(args.results))
    atomic_write_text(Path(args.results) / "REPORT.md", text)
    print(f"wrote {Path(args.results) / 'REPORT.md'}")


if __name__ == "__main__":
    main()
