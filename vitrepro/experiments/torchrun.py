"""Training one sweep configuration under `torchrun` (launcher='torchrun'): a leaf module, so the
scheduler (`sweep`) and the launch parameters (`launch`) both use it without importing each other."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile

def omp_threads(env: dict) -> int:
    """The intra-op threads of a torchrun process ($OMP_NUM_THREADS; 1 where unset, what `torchrun_train` sets)."""
    try:
        return max(1, int(env.get("OMP_NUM_THREADS") or 1))
    except ValueError:  # e.g. a nested "4,2": torch takes the first
        return max(1, int(str(env["OMP_NUM_THREADS"]).split(",")[0] or 1))


def torchrun_command(config_file: str, root: str, force: bool, n: int) -> list[str]:
    where = shlex.split(os.environ.get("VITREPRO_TORCHRUN_ARGS", "")) or ["--standalone"]
    return ([sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={n}", "-m", "vitrepro.train",
             "--config", config_file, "--store", root, "--progress", "log"] + (["--force"] if force else []))


def torchrun_train(cfg: dict, root: str, force: bool, n: int) -> dict:
    """Train one configuration under torchrun with ``n`` processes (launcher='torchrun'): the same run
    store, run id and record as a local run; a failure becomes a failed record. The children read this
    process's settings (a dry run's stand-in data included) from their environment."""
    from .. import settings, train
    from ..store import RunStore

    env = {**os.environ, **settings.as_environment(settings.get())}
    env.setdefault("OMP_NUM_THREADS", "1")
    rid = train.run_id_of(cfg, threads=omp_threads(env))  # the id the torchrun processes compute
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cfg, f)
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
