import json

import torch

from vitrepro.store import RunStore, atomic_torch_save, atomic_write_json, run_id_for


def test_run_id_stable_and_sensitive():
    a = {"model": "ViT-Nano/4", "lr": 0.001, "seed": 0}
    assert run_id_for(a) == run_id_for(dict(reversed(list(a.items()))))
    assert run_id_for(a) != run_id_for({**a, "seed": 1})
    assert len(run_id_for(a)) == 12


def test_atomic_writes(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": 1, "b": float("nan")})
    assert json.loads((tmp_path / "x.json").read_text())["a"] == 1
    atomic_torch_save(tmp_path / "m.pt", {"w": torch.ones(2)})
    assert torch.load(tmp_path / "m.pt")["w"].sum() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "x.json"]  # no temp files left


def test_frame_long_form(tmp_path):
    st = RunStore(tmp_path)
    for seed in (0, 1):
        cfg = {"experiment": "e", "model": "ViT-Nano/4", "seed": seed, "opts": {"pool": "gap"}, "shots": [1, 5]}
        rid = run_id_for(cfg)
        st.create("e", rid, cfg)
        for step in (1, 2, 3):
            st.log("e", rid, {"step": step, "loss": 1.0 / step})
        st.truncate_metrics("e", rid, 2)
        assert [r["step"] for r in st.metrics("e", rid)] == [1, 2]
        st.write_record("e", rid, {"run_id": rid, "status": "ok", "metrics": {"acc": 0.5 + seed},
                                   "wall_time_s": 1.5, "params": 10})
    st.create("e", "unfinished", {"experiment": "e", "seed": 9})
    df = st.frame("e")
    assert {"run_id", "experiment", "status", "model", "seed", "opts.pool", "metric", "value"} <= set(df.columns)
    assert len(df) == 6 and set(df.metric) == {"acc", "wall_time_s", "params"}
    assert df[df.metric == "acc"].sort_values("seed").value.tolist() == [0.5, 1.5]
    assert "unfinished" not in set(df.run_id)
    assert "incomplete" in set(st.frame(include_incomplete=True).status)
    assert st.frame("none").empty
