"""Shared fixtures and helpers of test_damo.py.

No network and nothing outside this folder is needed: a real Minari dataset is built in the test
session by rolling the carried Hopper-v5 behaviour policies (assets/policies/) in the real MuJoCo
env and writing the episodes with Minari's own API, under a temporary MINARI_DATASETS_PATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import make_dataset

HERE = Path(__file__).resolve().parent
POLICIES = HERE / "assets" / "policies"
# Any download attempt goes to a closed local port: the tests behave the same with or without network.
OFFLINE_ENV = {"HF_ENDPOINT": "http://127.0.0.1:9", "MINARI_REMOTE": "hf://farama-minari"}

# A tiny DAMO run: 2 epochs of 100 steps, small rollouts, a 2-epoch ensemble, 2 evaluation episodes, 3 held-out.
TINY = {"epochs": 2, "steps_per_epoch": 100, "log_every": 50, "rollout_freq": 50, "rollout_batch_size": 500,
        "rollout_length": 3, "dynamics_max_epochs": 2, "eval_episodes": 2, "heldout_episodes": 3, "threads": 1}


def flags(base: dict | None = None, **overrides) -> list[str]:
    """CLI flags from keyword arguments: flags(epochs=1, bc=True, cuda=False) -> --epochs 1 --bc --no-cuda.
    `base` (default TINY) is overridden by the keywords; a value None drops the flag."""
    out = []
    for k, v in {**(TINY if base is None else base), **overrides}.items():
        name = "--" + k.replace("_", "-")
        if v is None:
            continue
        if isinstance(v, bool):
            out.append(name if v else "--no-" + k.replace("_", "-"))
        else:
            out += [name, str(v)]
    return out


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes a minute or more (learning, SIGKILL resume, compile, video); "
                                       "deselect with -m 'not slow'")


def build(dataset_id: str, policy: str, steps: int, seed: int, **kw):
    return make_dataset.make_dataset(make_dataset.Args(policy=str(POLICIES / policy), dataset_id=dataset_id,
                                                       steps=steps, seed=seed, **kw))


# Set in a test re-run inside its own network namespace (in_own_network_namespace): the datasets already made.
NETNS_MINARI = "DAMO_TEST_NETNS_MINARI"


@pytest.fixture(scope="session")
def minari_root(tmp_path_factory):
    """mujoco/hopper/{medium,expert}-v0 made locally from the real Hopper-v5 behaviour policies."""
    if os.environ.get(NETNS_MINARI):  # inside a namespace re-run: the parent session's datasets
        yield Path(os.environ[NETNS_MINARI])
        return
    root = tmp_path_factory.mktemp("minari")
    old = {k: os.environ.get(k) for k in ("MINARI_DATASETS_PATH", *OFFLINE_ENV)}
    os.environ.update({"MINARI_DATASETS_PATH": str(root), **OFFLINE_ENV})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build("mujoco/hopper/medium-v0", "hopper-medium.npz", 8000, 0)
        build("mujoco/hopper/expert-v0", "hopper-expert.npz", 4000, 1)
    yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run_many(script: str, argvs: list[list[str]], root, timeout=600, stdout=False) -> list[tuple]:
    """Run `script`'s __main__ once per argv, all in one child process (the imports are paid once):
    [(exit status, stderr)] per argv, [(exit status, stderr, stdout)] with stdout=True. An exception other
    than SystemExit escapes as a traceback in the stderr of its call, which the tests reject."""
    code = f"""
import contextlib, io, json, runpy, sys, traceback
out = []
for argv in {argvs!r}:
    sys.argv = [{script!r}, *argv]
    err, got = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(got):
        try:
            runpy.run_path({str(HERE / script)!r}, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc(file=err)
            code = "traceback"
    out.append([code, err.getvalue(), got.getvalue()])
print(json.dumps(out))
"""
    env = {**os.environ, "MINARI_DATASETS_PATH": str(root), **OFFLINE_ENV, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return [tuple(r if stdout else r[:2]) for r in json.loads(p.stdout.splitlines()[-1])]


def error_line(code, err: str, *must: str) -> str:
    """Assert the contract of a refused input: exit status 2, no traceback, one `error:` message (from its
    line to the end of stderr) holding every string in `must`."""
    assert code == 2 and "Traceback" not in err, (code, err[-1500:])
    assert err.count("error:") == 1, err[-1500:]
    message = err[err.index("error:"):]
    for m in must:
        assert m in message, (m, message)
    return message


def run_cli(args: list[str], root, timeout=600, script="damo.py"):
    env = {**os.environ, "MINARI_DATASETS_PATH": str(root), **OFFLINE_ENV, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(HERE / script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=HERE)


@pytest.fixture(scope="session")
def e2e_run(minari_root, tmp_path_factory):
    """One tiny DAMO run through the CLI, shared by the tests that read its files."""
    runs = tmp_path_factory.mktemp("runs")
    p = run_cli(["--env-id", "hopper-medium-expert", "--seed", "3", "--runs-dir", str(runs), "--run-name", "e2e",
                 "--no-download", *flags(snapshot_every=100)], minari_root)
    assert p.returncode == 0, p.stderr[-3000:]
    return runs / "e2e"


def in_own_network_namespace(request, minari_root) -> bool:
    """Run the calling test again in a network namespace of its own, where the only interface is loopback, and
    return True once it passed there (the caller returns); inside that re-run, return False (the caller goes
    on). A test that starts Ray nodes calls it first: Ray 2.60 advertises this machine's interface address
    even when told 127.0.0.1, and in a namespace with loopback alone it has no other address to take, so no
    packet of the test can reach another address. Needs `unshare --net` (root, or user namespaces) and `ip`;
    where they are missing the test is skipped with the reason."""
    if os.environ.get(NETNS_MINARI):
        return False
    try:
        probe = subprocess.run(["unshare", "--net", "ip", "link", "set", "lo", "up"], capture_output=True, text=True,
                               timeout=30)
        why = probe.stderr.strip() if probe.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as e:
        why = str(e)
    if why:
        pytest.skip(f"cannot make a network namespace with loopback only (`unshare --net`: {why}); this test starts "
                    f"Ray nodes and runs only there (run the suite as root or with user namespaces)")
    cmd = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable, "-m", "pytest",
           "-q", "-p", "no:cacheprovider", "-W", "ignore", request.node.nodeid]
    env = {**os.environ, NETNS_MINARI: str(minari_root), "RAY_USAGE_STATS_ENABLED": "0"}
    p = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0 and " passed" in p.stdout, (p.stdout + p.stderr)[-4000:]
    return True
