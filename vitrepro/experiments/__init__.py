"""One module per reproduction notebook: its profiles, sweep, tables and figures.

    scaling              Fig. 3, Fig. 4, Fig. 5 (App. D.2)   notebooks/scaling.ipynb
    position_embeddings  App. D.4 Table 8, D.3, Fig. 7 centre notebooks/position_embeddings.ipynb
    transfer             Table 2, App. Table 5               notebooks/transfer.ipynb
    attention            Fig. 6, Fig. 7                      notebooks/attention.ipynb
"""
from __future__ import annotations

from pathlib import Path

NOTEBOOKS = ("scaling", "position_embeddings", "transfer", "attention")


def module(name: str):
    import importlib

    if name not in NOTEBOOKS:
        raise ValueError(f"unknown experiment {name!r}; one of {NOTEBOOKS}")
    return importlib.import_module(f"vitrepro.experiments.{name}")


def export_all(results: Path, profile: str = "cpu") -> None:
    """Re-export every notebook's results.csv from the run store (tables/figures need the notebook)."""
    from .results import atomic_write_text

    for name in NOTEBOOKS:
        mod = module(name)
        df = mod.collect(mod.Params(profile=profile, results_dir=str(Path(results) / name)))
        if len(df):
            atomic_write_text(Path(results) / name / "results.csv", df.to_csv(index=False))
