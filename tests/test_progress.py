"""What a sweep shows while it trains (issue 29): a widget bar over its runs in JupyterLab, log lines elsewhere."""
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

TINY = {"experiment": "p", "model": "ViT-Nano/4", "dataset": "digits", "batch_size": 32, "steps": 2,
        "warmup_steps": 1, "log_every": 1, "lr": 1e-3, "precision": "fp32",
        "evaluators": [{"type": "accuracy", "max_examples": 32}]}


def test_widget_frontend_only_in_a_kernel_that_lab_started(monkeypatch):
    """Catches: a widget bar under papermill (a line of `HBox(...)` in the log) or in a terminal."""
    from vitrepro import jupyter

    monkeypatch.delenv("VITREPRO_PROGRESS", raising=False)
    assert not jupyter.widget_frontend()  # plain Python (pytest): no kernel
    monkeypatch.setenv("VITREPRO_PROGRESS", "log")  # what launch_kernel sets under papermill
    assert not jupyter.widget_frontend()
    monkeypatch.setenv("VITREPRO_PROGRESS", "bar")
    assert jupyter.widget_frontend()


def test_progress_bar_is_a_widget_only_with_a_widget_front_end(monkeypatch):
    from tqdm.notebook import tqdm as widget_tqdm

    from vitrepro import jupyter
    from vitrepro.experiments import sweep

    monkeypatch.setattr(jupyter, "widget_frontend", lambda: False)
    assert sweep.progress_bar(3) is None
    monkeypatch.setattr(jupyter, "widget_frontend", lambda: True)
    bar = sweep.progress_bar(3)
    try:
        assert isinstance(bar, widget_tqdm) and bar.total == 3
    finally:
        bar.close()


class _Recorder:
    def __init__(self, total):
        self.total, self.n, self.postfix, self.closed = total, 0, [], False

    def update(self, k):
        self.n += k

    def set_postfix_str(self, s, refresh=True):
        self.postfix.append(s)

    def refresh(self):
        pass

    def close(self):
        self.closed = True


def test_sweep_moves_its_bar_once_per_run(tmp_path, monkeypatch):
    """Catches: a bar that stops short of the total (stored runs, skipped fine-tunes), lacks the sweep's ETA,
    or stays open after the sweep."""
    from vitrepro.experiments import common, sweep

    bars = []
    monkeypatch.setattr(sweep, "progress_bar", lambda total: bars.append(_Recorder(total)) or bars[-1])
    params = common.NotebookParams(profile="smoke", runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "r"))
    jobs = lambda: [common.Job(dict(TINY, seed=s), "pretrain") for s in (0, 1)]  # noqa: E731
    lines = []
    common.run_jobs(jobs(), params, log=lines.append, workers=1)
    common.run_jobs(jobs(), params, log=lines.append, workers=1)  # both stored now
    first, again = bars
    assert first.total == first.n == 2 and again.n == 2 and first.closed and again.closed
    assert first.postfix[0].startswith("ETA") and first.postfix[-1] == again.postfix[-1] == "done"
    assert sum("seed=1" in m for m in lines) == 2  # the log lines stay (they are the record in the notebook)
