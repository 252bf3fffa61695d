"""Training one sweep configuration under `torchrun` (launcher='torchrun'): a leaf module, so the
scheduler (`sweep`) and the launch parameters (`launch`) both use it without importing each other."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile

ENV = "VITREPRO_LAUNCHER"  # "torchrun:<nproc>" while a sweep runs under torchrun (read by the job trainer)


def torchrun_command(config_file: str, root: str, force: bool, n: int) -> list[str]:
    where = shlex.split(os.environ.get("VITREPRO_TORCHRUN_ARGS", "")) or ["--standalone"]
    return ([sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={n}", "-m", "vitrepro.train",
             "--config", config_file, "--store", root, "--progress", "log"] + (["--force"] if force else []))


def torchrun_train(cfg: dict, root: str, force: bool) -> dict | None:
    """Train one configuration under torchrun when this sweep runs with launcher='torchrun' (else None):
    the same run store, run id and record as a local run; a failure becomes a failed record."""
    spec = os.environ.get(ENV, "")
    if not spec.startswith("torchrun"):
        return None
    from .. import train
    from ..store import RunStore

    n = int(spec.split(":", 1)[1]) if ":" in spec else 1
    rid = train.run_id_of(cfg)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cfg, f)
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        proc = subprocess.run(torchrun_command(f.name, root, force, n), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    finally:
        os.unlink(f.name)
    lines = (proc.stdout or "").strip().splitlines()
    if lines:
        print("\n".join(lines[-40:]), flush=True)
    rec = RunStore(root).record(cfg["experiment"], rid)
    if rec is not None and (rec.get("status") != "ok" or proc.returncode == 0):
        return rec
    return {"status": "failed", "run_id": rid, "experiment": cfg.get("experiment"),
            "error": f"torchrun exited with {proc.returncode}: {' | '.join(lines[-3:])}"}
