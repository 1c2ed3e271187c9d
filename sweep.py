"""Sweeps of damo.py on Ray: datasets x variants x seeds with one command, on one machine or a cluster.

    python sweep.py --env-ids halfcheetah-medium walker2d-medium --seeds 0 1 2 --variants damo bc wo_er wo_ir \
        --sweep-dir sweeps/table -- --epochs 30 --rollout-batch-size 10000 --no-download
    python sweep.py ... --variants damo --grid alpha=0.5,1,2,5,10,20   # every variant at every value
    python sweep.py ... --address ray-head:6379            # the same sweep on an existing Ray cluster

Everything after `--` is damo.py flags shared by every run. A variant is `damo` (the defaults), `bc`
(--bc), `wo_er` (--beta 0), `wo_ir` (--alpha 0), `mopo` and `mobile` (--penalty: the peer with its published
settings for each dataset, damo.py's PEER_SETTINGS), or `NAME=FLAGS` (e.g. "unfiltered=--no-bc-filter").
On a cluster started with token authentication (Ray's default for `ray start --head`), this machine
needs the cluster's token: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (README "Sweeps").

What a sweep does:
- one dynamics ensemble per dataset (damo.py --dynamics-only, in SWEEP/dynamics/ENV_ID/), trained once;
  the runs of that dataset wait for it and get it with --dynamics-path (BC runs need none); runs on a
  subset of the data (--data-fraction, --data-episodes, --data-seed) get an ensemble of that subset;
- every run is an ordinary damo.py run in SWEEP/runs/ENV_ID__VARIANT__SEED/ (plot.py and --eval-only
  work on it), its output in SWEEP/logs/; each one is a Ray task with --cpus-per-run CPUs (its torch
  threads) and --gpus-per-run GPUs (fractions let several small runs share one GPU);
- started again after a kill or a lost node, the same command skips finished runs and ensembles and
  continues unfinished runs from their last checkpoint (damo.py --resume; on a CPU a resumed run
  equals an uninterrupted one); a larger --epochs extends finished runs;
- a live table of the runs (done / running / waiting / failed, steps, latest score); a failed run is
  reported with the tail of its log and the others go on; at the end plot.py's table and figure of
  the sweep's runs (SWEEP/curves.png).
On a cluster, the project folder, the sweep folder and the datasets must be at the same paths on
every node (a shared file system, as for slurm). Nothing in damo.py depends on Ray.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {"damo": [], "bc": ["--bc"], "wo_er": ["--beta", "0"], "wo_ir": ["--alpha", "0"],
            "mopo": ["--penalty", "mopo"], "mobile": ["--penalty", "mobile"]}  # peers: each dataset's published settings
# set by the sweep itself for every run; in --flags or a variant they would break its bookkeeping
MANAGED = ("env_id", "seed", "runs_dir", "run_name", "resume", "dynamics_path", "dynamics_only", "threads",
           "eval_only", "benchmark")
SHARED_ENSEMBLE = ("n_ensemble", "n_elites", "dynamics_hidden", "dynamics_lr", "dynamics_batch_size",
                   "dynamics_max_epochs", "dynamics_patience", "dynamics_holdout", "dataset_path", "download")
# a variant or grid value may train on a subset of the data: its runs get an ensemble of that subset
DATA_SUBSET = ("data_fraction", "data_episodes", "data_seed")


class SweepError(Exception):
    """A bad sweep specification, found before anything starts: one `error:` message, exit status 2."""


@dataclass
class SweepArgs:
    env_ids: tuple[str, ...] = ("hopper-medium-expert",)
    """datasets: damo.py --env-id values (short ids or full Minari ids)"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """seeds of every variant on every dataset"""
    variants: tuple[str, ...] = ("damo", "bc")
    """damo, bc, wo_er, wo_ir, mopo, mobile, or NAME=FLAGS with damo.py flags of that variant"""
    grid: tuple[str, ...] = ()
    """FLAG=V1,V2,... (e.g. alpha=1,5,10): every variant at every value (several: every combination);
    runs are named VARIANT_FLAGVALUE (damo_alpha5)"""
    sweep_dir: str = "sweeps/sweep"
    """folder of the sweep: dynamics/, runs/, logs/, curves.png"""
    address: Optional[str] = None
    """an existing Ray cluster (host:port, ray://host:port or auto); default: a local Ray on this machine"""
    num_cpus: Optional[int] = None
    """local Ray only: CPUs the sweep may use (default: all of this machine's)"""
    cpus_per_run: int = 1
    """CPUs per run (a run's torch threads)"""
    gpus_per_run: float = 0.0
    """GPUs per run; a fraction lets several runs share one GPU (0: CPU runs)"""
    progress_every: float = 30.0
    """seconds between progress tables"""
    plot: bool = True
    """at the end, plot.py's table and figure of the sweep's runs"""


# ----------------------------------------------------------------------------------------------------
# the specification: which runs, with which flags, checked before anything starts
# ----------------------------------------------------------------------------------------------------


def parse_flags(flags: list[str], what: str):
    """damo.py flags -> damo.Args, or a SweepError naming `what` (tyro's own message kept short)."""
    import tyro

    import damo

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = tyro.cli(damo.Args, args=flags)
        damo.check_args(args)
    except SystemExit:
        frame = " │╭╮╰╯─"  # tyro draws its message in a box
        detail = " ".join(line.strip(frame) for line in err.getvalue().splitlines() if line.strip(frame))
        raise SweepError(f"{what}: {' '.join(flags)!r} are not valid damo.py flags ({detail[:300]}); "
                         f"see python damo.py --help") from None
    except damo.DamoError as e:
        raise SweepError(f"{what}: {e}") from None
    given = damo.explicit_flags(flags)
    managed = sorted(given & set(MANAGED))
    if managed:
        raise SweepError(f"{what}: {', '.join('--' + f.replace('_', '-') for f in managed)} is set by the sweep "
                         f"for each run; use --env-ids, --seeds, --sweep-dir, --cpus-per-run instead")
    return args, given


def plan(sa: SweepArgs, common: list[str]) -> tuple[list[dict], dict, object]:
    """The runs of the sweep ([spec]), the ensembles ({env_id: spec}) and the common flags as damo.Args,
    every input checked."""
    import damo

    if not sa.env_ids or not sa.seeds or not sa.variants:
        raise SweepError("a sweep needs at least one --env-ids, --seeds and --variants value")
    if sa.cpus_per_run < 1 or sa.gpus_per_run < 0:
        raise SweepError(f"--cpus-per-run {sa.cpus_per_run} / --gpus-per-run {sa.gpus_per_run}: need >= 1 CPU and "
                         f">= 0 GPUs per run")
    for env_id in sa.env_ids:
        if "/" not in env_id and env_id not in damo.SHORT_IDS:
            raise SweepError(f"unknown env id '{env_id}'; accepted: {', '.join(damo.SHORT_IDS)}, or a full Minari id")
    base, _ = parse_flags(common, "the common flags (after --)")
    variants = {}
    for v in sa.variants:
        name, sep, rest = v.partition("=")
        if not sep and name not in VARIANTS:
            raise SweepError(f"unknown variant '{v}'; use {', '.join(VARIANTS)} or NAME=FLAGS "
                             f"(e.g. \"fast=--tau 0.01\")")
        if sep and (not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum()):
            raise SweepError(f"variant '{v}': NAME must be letters, digits, -, _ or . (it names run folders)")
        flags = VARIANTS[name] if not sep else rest.split()
        variants[name] = flags
    if len(variants) != len(sa.variants):
        raise SweepError(f"two variants share a name in {list(sa.variants)}")
    expanded = grid_variants(variants, sa.grid)
    variants = {}
    for name, flags in expanded.items():
        args, given = parse_flags([*common, *flags], f"variant '{name}'")
        shared = sorted(given & set(SHARED_ENSEMBLE) - damo.explicit_flags(common))
        if shared:
            names = ", ".join("--" + f.replace("_", "-") for f in shared)
            raise SweepError(f"variant '{name}': {names} would change the ensemble, which all runs of a dataset "
                             f"share; put it in the common flags")
        variants[name] = (flags, args.bc, tuple((f, getattr(args, f)) for f in DATA_SUBSET
                                                if getattr(args, f) != getattr(damo.Args(), f)))
    if not base.download:  # the data must be here already: say which is missing now, not in a task
        for env_id in sa.env_ids:
            try:
                damo.dataset_ids_for(env_id, download=False)
            except damo.DamoError as e:
                raise SweepError(str(e)) from None
    root = os.path.abspath(sa.sweep_dir)
    steps = base.epochs * base.steps_per_epoch
    ensembles, runs = {}, []  # one ensemble per dataset (and per data subset a variant trains on)
    for env_id in sa.env_ids:
        for name, (flags, is_bc, subset) in variants.items():
            key = env_id.replace("/", "-") + "".join(f"__{f}{v}" for f, v in subset)
            sub_flags = [x for f, v in subset for x in ("--" + f.replace("_", "-"), str(v))]
            ensembles.setdefault(key, {"name": key, "env_id": env_id, "kind": "ensemble",
                                       "run_dir": os.path.join(root, "dynamics", key),
                                       "argv": [*common, *sub_flags, "--env-id", env_id, "--dynamics-only"]})
            for seed in sa.seeds:
                run = f"{env_id.replace('/', '-')}__{name}__{seed}"
                runs.append({"name": run, "env_id": env_id, "bc": is_bc, "steps": steps, "epochs": base.epochs,
                             "run_dir": os.path.join(root, "runs", run), "kind": "run", "ensemble": key,
                             "argv": [*common, *flags, "--env-id", env_id, "--seed", str(seed)]})
    for spec in [*runs, *ensembles.values()]:
        suffix = ".dynamics.log" if spec["kind"] == "ensemble" else ".log"
        spec["log"] = os.path.join(root, "logs", spec["name"] + suffix)
        spec["threads"] = sa.cpus_per_run
    check_same_sweep(root, base)
    return runs, ensembles, base


def grid_variants(variants: dict, grid: tuple) -> dict:
    """Each variant at every combination of the --grid values: {name: flags}, e.g. damo_alpha5: [--alpha 5]."""
    import itertools

    axes = []
    for item in grid:
        flag, sep, values = item.partition("=")
        vals = [v for v in values.split(",") if v]
        if not sep or not flag.lstrip("-") or not vals:
            raise SweepError(f"--grid item '{item}' is not FLAG=V1,V2,... (e.g. alpha=1,5,10)")
        flag = flag.lstrip("-").replace("-", "_")
        if flag in MANAGED:
            raise SweepError(f"--grid {flag}: --{flag.replace('_', '-')} is set by the sweep for each run")
        axes.append([(flag, v) for v in vals])
    out = {}
    for name, flags in variants.items():
        for combo in itertools.product(*axes):
            suffix = "".join(f"_{f}{v}" for f, v in combo)
            out[name + suffix] = [*flags, *(x for f, v in combo for x in ("--" + f.replace("_", "-"), v))]
    return out


def common_record(base) -> dict:
    from dataclasses import asdict

    return {k: v for k, v in asdict(base).items() if k != "epochs"}


def check_same_sweep(root: str, base):
    """A sweep folder belongs to one set of common flags (its ensembles and finished runs were made with
    them); only --epochs may grow. The first sweep records them in SWEEP/sweep.json. A flag damo.py gained
    since then counts as given at its default (the runs were made without it, so with the behaviour its
    default keeps); a flag it lost since then is not compared (it can no longer be passed)."""
    import damo

    path = os.path.join(root, "sweep.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        old = json.load(f)["common_flags"]
    new = common_record(base)
    old = {**{k: v for k, v in common_record(damo.Args()).items() if k not in old}, **old}
    diff = sorted(k for k in new if old.get(k) != new.get(k))
    if diff:
        was = ", ".join(f"--{k.replace('_', '-')} {old.get(k)} (now {new.get(k)})" for k in diff)
        raise SweepError(f"{root} was swept with other common flags: {was}. Its ensembles and runs were made with "
                         f"those; pass the same flags (only --epochs may grow), or another --sweep-dir")


def cluster_token(address: Optional[str]) -> bool:
    """Ray 2.60 starts a `ray start --head` cluster with token authentication unless RAY_AUTH_MODE=disabled, and
    keeps the token in ~/.ray/auth_token; but a client sends it only when RAY_AUTH_MODE=token, and without it
    the connection is refused. So where a token is at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or that
    file) and the mode is not set, send it (a cluster without authentication ignores it). True if sent."""
    if address is None or os.environ.get("RAY_AUTH_MODE"):
        return os.environ.get("RAY_AUTH_MODE") == "token"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
        os.environ["RAY_AUTH_MODE"] = "token"
        return True
    return False


def check_address(address: Optional[str]):
    """An existing cluster must answer before anything starts (Ray itself would wait for minutes)."""
    if address is None or address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise SweepError(f"--address {address}: expected host:port (e.g. ray-head:6379) or ray://host:10001")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise SweepError(f"--address {address}: no Ray cluster answers there ({e.strerror or e}); start one with "
                         f"`ray start --head` on that machine, or drop --address to run on this machine") from None


# ----------------------------------------------------------------------------------------------------
# one task: an ensemble or a run, continued where an earlier sweep left it
# ----------------------------------------------------------------------------------------------------


def finished(spec: dict) -> bool:
    if spec["kind"] == "ensemble":
        return os.path.isfile(os.path.join(spec["run_dir"], "dynamics.pt"))
    try:
        with open(os.path.join(spec["run_dir"], "results.json")) as f:
            return json.load(f)["global_steps"] >= spec["steps"]
    except (OSError, ValueError, KeyError):
        return False


def tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.rstrip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()]
        return "\n".join(lines[-n:])
    except OSError:
        return "(no log)"


def execute(spec: dict, project: str, ensemble: Optional[dict] = None) -> dict:
    """Run one damo.py command in this process (a Ray worker): start it, or --resume it from its checkpoint,
    or skip it if it is done. What to do is decided here, when the task starts, so that Ray's retry of a
    task lost with its node continues the run instead of starting it over."""
    if project not in sys.path:
        sys.path.insert(0, project)
    import damo

    out = {"name": spec["name"], "kind": spec["kind"], "run_dir": spec["run_dir"], "log": spec["log"]}
    if finished(spec):
        return {**out, "status": "skipped"}
    if ensemble is not None and ensemble["status"] not in ("done", "skipped"):
        return {**out, "status": "failed", "rc": None,
                "tail": f"its dataset's ensemble failed (log {ensemble['log']})"}
    ckpt = os.path.join(spec["run_dir"], "checkpoint.pt")
    if os.path.isfile(ckpt) and spec["kind"] == "run":
        argv = ["--resume", spec["run_dir"], "--epochs", str(spec["epochs"]), "--threads", str(spec["threads"])]
    else:
        shutil.rmtree(spec["run_dir"], ignore_errors=True)  # killed before its first checkpoint: start over
        argv = [*spec["argv"], "--runs-dir", os.path.dirname(spec["run_dir"]),
                "--run-name", os.path.basename(spec["run_dir"]), "--threads", str(spec["threads"])]
        if ensemble is not None:
            argv += ["--dynamics-path", os.path.join(ensemble["run_dir"], "dynamics.pt")]
    os.makedirs(os.path.dirname(spec["log"]), exist_ok=True)
    with open(spec["log"], "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print(f"\n$ python damo.py {' '.join(argv)}", flush=True)
        try:
            rc = damo.cli(argv)
        except BaseException:  # a bug, not a bad input: keep the traceback in the log, go on with the others
            traceback.print_exc()
            rc = 1
    return {**out, "status": "done" if rc == 0 else "failed", "rc": rc, "tail": tail(spec["log"]) if rc else ""}


# ----------------------------------------------------------------------------------------------------
# the driver: submit the tasks, show progress, collect, plot
# ----------------------------------------------------------------------------------------------------


def latest(spec: dict) -> tuple[str, str]:
    """The run's last evaluation in eval.csv: (step, normalised score)."""
    try:
        with open(os.path.join(spec["run_dir"], "eval.csv")) as f:
            last = list(csv.reader(f))[-1]
        return last[0], f"{float(last[4]):.1f}"
    except (OSError, IndexError, ValueError):
        return "-", "-"


def progress(specs: list[dict], results: dict, t0: float) -> str:
    def state(s):
        if s["name"] in results:
            return results[s["name"]]["status"]
        try:
            return "running" if os.path.getmtime(s["log"]) >= t0 else "waiting"
        except OSError:
            return "waiting"

    states = {s["name"]: state(s) for s in specs}
    counts = {k: sum(v == k for v in states.values()) for k in ("done", "skipped", "running", "waiting", "failed")}
    lines = [f"[sweep, {(time.time() - t0) / 60:.1f} min] " + ", ".join(f"{k} {v}" for k, v in counts.items())
             + f" of {len(specs)}"]
    for s in specs:
        step, score = latest(s) if s["kind"] == "run" else ("", "")
        lines.append(f"  {s['name']:<56} {states[s['name']]:<8} {'step ' + step if step else '':>12} "
                     f"{'score ' + score if score else ''}")
    return "\n".join(lines)


def run_sweep(sa: SweepArgs, common: list[str]) -> int:
    runs, ensembles, base = plan(sa, common)
    check_address(sa.address)
    if not sa.address:
        # A local sweep needs no other machine, so its Ray stays on loopback: Ray 2.60 otherwise advertises this
        # machine's interface address (even for address="local") and its processes talk to each other through
        # it. This switch (read when Ray is imported, and by every Ray process this one starts) makes Ray use
        # 127.0.0.1 and turns off only multi-node support. A cluster (--address) keeps real addresses.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    env_vars = {k: os.environ[k] for k in ("MINARI_DATASETS_PATH", "HF_ENDPOINT", "MINARI_REMOTE", "MUJOCO_GL",
                                           "PYTHONWARNINGS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") if k in os.environ}
    init = {"runtime_env": {"env_vars": env_vars}, "include_dashboard": False, "log_to_driver": False}
    token = cluster_token(sa.address)
    try:
        if sa.address:
            ray.init(address=sa.address, **init)
        else:
            ray.init(address="local", num_cpus=sa.num_cpus, **init)  # a new Ray of its own, never one found running
    except Exception as e:
        hint = ""
        if sa.address:  # what Ray says is only "Failed to connect"; the usual cause on a cluster is its token
            hint = (". If the cluster uses token authentication (Ray's default for `ray start --head`), this machine "
                    "needs its token: set RAY_AUTH_TOKEN to the output of `ray get-auth-token` on the head (or copy "
                    "the head's ~/.ray/auth_token here)" + (" (a token was sent: it may not be the cluster's)" if token else "")
                    + "; README \"Sweeps\"")
        raise SweepError(f"Ray did not start ({type(e).__name__}: {e}){hint}") from None
    root = os.path.abspath(sa.sweep_dir)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "sweep.json"), "w") as f:
        json.dump({"common_flags": common_record(base), "argv": sys.argv[1:]}, f, indent=2)
    nodes = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
    print(f"sweep {root}: {len(runs)} runs, {len(ensembles)} datasets, Ray {ray.available_resources()}, "
          f"nodes at {', '.join(nodes)}", file=sys.stderr)
    task = ray.remote(execute)
    opts = {"num_cpus": sa.cpus_per_run, "num_gpus": sa.gpus_per_run, "max_retries": 3}
    needed = [spec for e, spec in ensembles.items() if any(r["ensemble"] == e and not r["bc"] for r in runs)]
    specs, results, t0 = [*needed, *runs], {}, time.time()
    # what a previous sweep finished is not queued again (each task checks once more when it starts)
    results.update({s["name"]: {**{k: s[k] for k in ("name", "kind", "run_dir", "log")}, "status": "skipped"}
                    for s in specs if finished(s)})
    ens = {s["name"]: results.get(s["name"]) or task.options(**opts).remote(s, HERE) for s in needed}
    refs = {ens[s["name"]]: s for s in needed if s["name"] not in results}
    # a run's ensemble (or its result) is an argument: Ray starts the run once the ensemble task has returned
    refs.update({task.options(**opts).remote(r, HERE, None if r["bc"] else ens[r["ensemble"]]): r
                 for r in runs if r["name"] not in results})
    pending = list(refs)
    print(progress(specs, results, t0), file=sys.stderr, flush=True)
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=sa.progress_every)
        for ref in ready:
            spec = refs[ref]
            try:
                res = ray.get(ref)
            except ray.exceptions.RayError as e:  # the task itself was lost (node died after its retries)
                res = {"name": spec["name"], "status": "failed", "rc": None, "log": spec["log"],
                       "tail": str(e)[-2000:]}
            results[spec["name"]] = res
            if res["status"] == "failed":
                print(f"\nFAILED {spec['name']} (exit status {res['rc']}, log {spec['log']}):\n{res['tail']}\n",
                      file=sys.stderr)
        print(progress(specs, results, t0), file=sys.stderr, flush=True)
    ray.shutdown()
    failed = [n for n, r in results.items() if r["status"] == "failed"]
    print(f"sweep {root}: {len(results) - len(failed)} of {len(results)} tasks done or already done"
          + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    if sa.plot and any(os.path.isfile(os.path.join(r["run_dir"], "eval.csv")) for r in runs):
        import plot

        plot.main([os.path.join(root, "runs"), "--out", os.path.join(root, "curves")])
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    import tyro

    own, common = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    sa = tyro.cli(SweepArgs, args=own, description=__doc__)
    try:
        return run_sweep(sa, common)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
