"""Figures from damo.py runs: learning curves over seeds, and the paper's alignment diagnostics.

    python plot.py runs/                      # learning curves + a markdown table (= plot.py curves runs/)
    python plot.py runs/ --band ci95          # 95% bootstrap band instead of +- std
    python plot.py diagnose runs/RUN          # offline / synthetic / real data, value over-estimation,
                                              # discriminator probabilities, for one checkpoint
    python plot.py robustness runs/           # final policies under sensor noise (--eval-only --obs-noise)
    python plot.py data hopper-medium-expert  # per source dataset: episode length, reward per step and
                                              # discounted return from the start (what a critic can see)
    python plot.py --help                     # every command; python plot.py COMMAND --help: its flags

Curves (the paper's Fig. 3a / 5 style): runs are grouped by env id and variant (DAMO, w/o er,
w/o ir, BC, and any non-default alpha / beta / eta), each run's eval.csv is interpolated onto the
group's common grid of gradient steps, and the mean over seeds is drawn with a shaded band. A run
folder that is incomplete or corrupt is skipped with a warning.

Diagnostics (the paper's Figs. 1, 3b, 4 style): (s, a, s' - s) of offline data, synthetic data (the
trained policy rolled in the learned model from offline states) and real data (the trained policy in
the real environment), embedded in 2-D by PCA fitted on the offline data; Q(s0, pi(s0)) against the
discounted Monte-Carlo return actually obtained from real start states; the discriminator's
probability of "offline" on the three sets; for a combined dataset, which source's states the policy
visits; and the return when the critic picks each action among perturbations of pi(s) (does the
critic know better actions than the actor takes?). The numbers go to a JSON beside the figure.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from dataclasses import dataclass, replace
from typing import Annotated, Literal, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# learning curves
# ----------------------------------------------------------------------------------------------------


def variant_label(args: dict, family: str = "") -> str:
    """DAMO / w/o er / w/o ir / BC, plus every knob that differs from damo.py's defaults for that dataset."""
    import damo

    dataset = damo.dataset_name(args.get("dataset_path") or args.get("env_id", ""))
    d = damo.with_env_defaults(damo.Args(), family, dataset)
    peer = args.get("penalty", "none")
    if peer != "none":  # MOPO / MOBILE: labelled against their own published settings
        try:
            d = damo.with_peer_settings(replace(d, penalty=peer), dataset, {"penalty"})
        except damo.DamoError:
            pass
    if args.get("bc"):
        sub = [f"{k}={args[k]:g}" for k in ("data_fraction", "data_episodes") if args.get(k) not in (None, 1.0)]
        return "BC" + (f" ({', '.join(sub)})" if sub else "")
    alpha, beta = args.get("alpha", d.alpha), args.get("beta", d.beta)
    name = {"mopo": "MOPO", "mobile": "MOBILE"}.get(peer) or ("w/o ir" if alpha == 0 else "w/o er" if beta == 0 else "DAMO")
    knobs = ("alpha", "beta", "bc_coef", "bc_filter", "real_ratio", "rollout_length", "gamma", "tau", "actor_lr", "critic_lr",
             "alpha_ent_lr", "backup_entropy", "data_fraction", "data_episodes", "penalty_coef", "alpha_ent_fixed",
             "actor_lr_schedule")
    extra = [f"{k}={args[k]}" if isinstance(args[k], str) else f"{k}={args[k]:g}" for k in knobs
             if k in args and args[k] != getattr(d, k) and not (k == "beta" and beta == 0)
             and not (alpha == 0 and k in ("alpha", "bc_coef", "bc_filter"))]  # inert at alpha 0
    return name + (f" ({', '.join(extra)})" if extra else "")


def variant_key(label: str) -> tuple:
    """Tables list DAMO first, then its peers, then BC, then any other variant by name."""
    return {"DAMO": 0, "MOPO": 1, "MOBILE": 2, "BC": 3}.get(label, 4), label


QUALITY_ORDER = {"random": 0, "simple": 0, "medium": 1, "medium-replay": 2, "medium-expert": 3, "expert": 4}


def dataset_key(env_id: str) -> tuple:
    """Sort datasets as papers' tables do: by environment, then medium, medium-replay, medium-expert."""
    name = env_id.split("/", 1)[1] if env_id.count("/") == 2 else env_id  # mujoco/hopper/medium-v0
    family, _, quality = name.replace("/", "-", 1).partition("-")
    return family, QUALITY_ORDER.get(re.sub(r"-v\d+$", "", quality), 9), env_id


def read_run(path: str) -> dict:
    """One run folder -> env id, variant, steps, scores, returns. Raises on anything incomplete."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(path, "eval.csv")) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError("eval.csv has no evaluation rows yet")
    steps = np.array([int(r["global_step"]) for r in rows])
    score = np.array([float(r["normalized_score"]) for r in rows])
    ret = np.array([float(r["return_mean"]) for r in rows])
    if not np.all(np.diff(steps) > 0):
        raise ValueError("eval.csv is not a clean series (steps do not increase)")
    bad = steps[~(np.isfinite(ret) & np.isfinite(score))]
    if len(bad):
        raise ValueError(f"eval.csv has non-finite returns or scores (nan/inf) at steps {bad.tolist()[:5]}; "
                         f"the run diverged or the file was edited")
    heldout = None
    if os.path.exists(os.path.join(path, "results.json")):
        with open(os.path.join(path, "results.json")) as f:
            heldout = json.load(f).get("heldout")
    return {"path": path, "env_id": cfg["args"]["env_id"], "variant": variant_label(cfg["args"], cfg.get("data", {}).get("env_family", "")),
            "seed": cfg["args"]["seed"], "steps": steps, "score": score, "return": ret,
            "finished": os.path.exists(os.path.join(path, "results.json")), "args": cfg["args"],
            "data": cfg.get("data", {}), "heldout": heldout}


def is_ensemble(run_dir: str) -> bool:
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            return bool(json.load(f)["args"].get("dynamics_only"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def find_runs(root: str) -> list[dict]:
    runs = []
    for dirpath, dirnames, filenames in sorted(os.walk(root, followlinks=True)):  # a folder of links to runs too
        if "config.json" in filenames or "eval.csv" in filenames:
            dirnames.clear()
            if is_ensemble(dirpath):  # a sweep's SWEEP/dynamics/*: a model, no policy to score
                continue
            try:
                runs.append(read_run(dirpath))
            except Exception as e:  # incomplete or corrupt: say which and go on
                print(f"warning: skipping run folder {dirpath}: {type(e).__name__}: {e}", file=sys.stderr)
    return runs


def on_grid(runs: list[dict], key: str):
    """Interpolate each run onto the union of the group's eval steps; a run counts only up to its last
    evaluation (a running run does not pull the tail down). Returns grid [G] and values [R, G] (NaN = absent)."""
    grid = np.unique(np.concatenate([r["steps"] for r in runs]))
    vals = np.full((len(runs), len(grid)), np.nan)
    for i, r in enumerate(runs):
        inside = (grid >= r["steps"][0]) & (grid <= r["steps"][-1])
        vals[i, inside] = np.interp(grid[inside], r["steps"], r[key])
    return grid, vals


def band(vals: np.ndarray, kind: str, rng: np.random.Generator):
    mean = np.nanmean(vals, 0)
    if kind == "std":
        half = np.nanstd(vals, 0)
        return mean, mean - half, mean + half
    lo, hi = np.empty_like(mean), np.empty_like(mean)
    for g in range(vals.shape[1]):  # 95% bootstrap interval of the mean over seeds
        v = vals[~np.isnan(vals[:, g]), g]
        boots = rng.choice(v, (1000, len(v))).mean(1)
        lo[g], hi[g] = np.percentile(boots, [2.5, 97.5])
    return mean, lo, hi


def summary_table(runs: list[dict]) -> str:
    groups = {}
    for r in runs:
        groups.setdefault((r["env_id"], r["variant"]), []).append(r)
    lines = ["| env | variant | seeds | held-out score | final score | last-10 score | final return | last-10 return | steps |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (env, var), rs in sorted(groups.items(), key=lambda kv: (dataset_key(kv[0][0]), kv[0][1])):
        def ms(x):
            return f"{np.mean(x):.1f} +- {np.std(x):.1f}"
        final_s = [r["score"][-1] for r in rs]
        last_s = [r["score"][-10:].mean() for r in rs]
        final_r = [r["return"][-1] for r in rs]
        last_r = [r["return"][-10:].mean() for r in rs]
        steps = sorted({int(r["steps"][-1]) for r in rs})
        held = [r["heldout"]["normalized_score"] for r in rs if r["heldout"]]
        held = f"{ms(held)} ({len(held)})" if held else "-"  # (how many runs have one)
        lines.append(f"| {env} | {var} | {len(rs)} | {held} | {ms(final_s)} | {ms(last_s)} | {ms(final_r)} | {ms(last_r)} | "
                     f"{'/'.join(map(str, steps))} |")
    return "\n".join(lines)


def plot_curves(runs: list[dict], out: str, kind: str = "std", key: str = "score") -> list[str]:
    envs = sorted({r["env_id"] for r in runs}, key=dataset_key)
    cols = min(3, len(envs))  # a panel per dataset, three to a row
    rows = -(-len(envs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(envs):]:
        ax.set_visible(False)
    rng = np.random.default_rng(0)
    # one colour per variant in every panel
    color = {v: f"C{i % 10}" for i, v in enumerate(sorted({r["variant"] for r in runs}))}
    for ax, env in zip(axes.flat, envs):
        variants = sorted({r["variant"] for r in runs if r["env_id"] == env})
        for v in variants:
            rs = [r for r in runs if r["env_id"] == env and r["variant"] == v]
            grid, vals = on_grid(rs, key)
            mean, lo, hi = band(vals, kind, rng)
            line, = ax.plot(grid, mean, color=color[v], label=f"{v} (n={len(rs)})")
            ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(env)
        ax.set_xlabel("gradient steps")
        ax.set_ylabel("normalised score" if key == "score" else "return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title=f"mean, band: {'+- std' if kind == 'std' else '95% bootstrap CI'} over seeds",
                  title_fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    paths = [out + ".png", out + ".pdf"]
    for p in paths:
        fig.savefig(p, dpi=110)
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------------------
# diagnostics of one checkpoint
# ----------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------
# sensitivity: last-10 score against one setting's value (the paper's Fig. 5, coverage, noise)
# ----------------------------------------------------------------------------------------------------


def save_figure(fig, out: str, payload, dpi: int = 130) -> list[str]:
    """OUT.png, OUT.pdf and the figure's numbers in OUT.json; returns the three paths."""
    fig.tight_layout()
    paths = [f"{out}.png", f"{out}.pdf", f"{out}.json"]
    for path in paths[:2]:
        fig.savefig(path, dpi=dpi)
    plt.close(fig)
    with open(paths[2], "w") as f:
        json.dump(payload, f, indent=2)
    return paths


def setting_value(run: dict, param: str):
    """The run's value of `param`: a damo.py flag from its config.json, or `action_noise`, the noise of the
    behaviour data (make_dataset.py --action-noise, kept in the dataset's metadata; 0 when absent)."""
    if param == "action_noise":
        noise = [v for v in run["data"].get("action_noise") or [] if v is not None]
        return float(max(noise)) if noise else 0.0
    import damo

    # a run from before the flag existed ran as its default does (all episodes: --data-fraction 1)
    v = run["args"].get(param, damo.Args.__dataclass_fields__[param].default)
    return None if v is None or isinstance(v, bool) else float(v)


def sensitivity(runs: list[dict], param: str, out: str) -> tuple[list[dict], list[str]]:
    """One panel per dataset (per environment for action_noise, whose datasets differ by noise): each
    variant's last-10 score (mean of the last 10 evaluations) against `param`, mean +- population std over
    seeds with every seed as a dot; a variant measured at one value only (e.g. BC in an alpha sweep) is a
    horizontal line; the data's average episode (normalised) is a dashed grey line. Returns the table."""
    import damo

    if param != "action_noise" and param not in damo.Args.__dataclass_fields__:
        raise damo.DamoError(f"unknown setting '{param}': pass a damo.py flag name (alpha, data_fraction, ...) or "
                             f"action_noise")
    rows = []
    for r in runs:
        if not r["finished"]:  # a last-10 of a run still going is not comparable
            print(f"warning: {r['path']} has not finished; left out", file=sys.stderr)
            continue
        x = setting_value(r, param)
        if x is None or len(r["score"]) == 0:
            continue
        family = r["data"].get("env_family", r["env_id"].split("-")[0])
        labelled = {**r["args"], param: None} if param in r["args"] else r["args"]
        rows.append({"panel": family if param == "action_noise" else r["env_id"], "variant":
                     variant_label({k: v for k, v in labelled.items() if v is not None}, family),
                     "x": x, "seed": r["seed"], "y": float(np.mean(r["score"][-10:])),
                     "data_score": r["data"].get("data_score_mean")})
    if not rows:
        raise damo.DamoError(f"no run has a value of '{param}' (a damo.py flag in config.json, or action_noise)")
    return draw_against(rows, param, "last-10 normalised score", out)


def draw_against(rows: list[dict], param: str, ylabel: str, out: str) -> tuple[list[dict], list[str]]:
    """The figure of `sensitivity` and `robustness`: rows {panel, variant, x, seed, y, data_score} -> one
    panel per dataset, y against x per variant (mean +- population std over seeds, seeds as dots; one value
    only: a line), the data's average dashed. Writes OUT.{png,pdf,json}; returns the table and the paths."""
    panels = sorted({r["panel"] for r in rows}, key=dataset_key)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    table = []
    for ax, panel in zip(axes[0], panels):
        mine = [r for r in rows if r["panel"] == panel]
        xs_all = sorted({r["x"] for r in mine})
        for j, variant in enumerate(sorted({r["variant"] for r in mine}, key=lambda v: (v != "DAMO", v))):
            pts = [r for r in mine if r["variant"] == variant]
            xs = sorted({r["x"] for r in pts})
            stats = [(x, np.array([r["y"] for r in pts if r["x"] == x])) for x in xs]
            table += [{"panel": panel, "variant": variant, param: x, "seeds": len(v), "mean": float(v.mean()),
                       "std": float(v.std())} for x, v in stats]
            color = f"C{j}"
            if len(xs) == 1:  # measured at one value: a reference line
                label = variant if variant.startswith("BC") else f"{variant} ({param}={xs[0]:g})"  # BC has no alpha
                ax.axhline(stats[0][1].mean(), color=color, lw=1.2, label=f"{label}, n={len(stats[0][1])}")
                continue
            m, sd = np.array([v.mean() for _, v in stats]), np.array([v.std() for _, v in stats])
            ax.plot(xs, m, "-o", color=color, label=f"{variant}, seeds per value: "
                    + ",".join(str(len(v)) for _, v in stats), ms=4)
            ax.fill_between(xs, m - sd, m + sd, color=color, alpha=0.2)
            for r in pts:
                ax.plot(r["x"], r["y"], ".", color=color, alpha=0.5, ms=3)
        data = sorted({(r["x"], r["data_score"]) for r in mine if r["data_score"] is not None})
        if data:
            dx = [x for x, _ in data]
            if len(set(dx)) == 1:
                ax.axhline(data[0][1], color="grey", ls="--", lw=1, label="data average")
            else:
                ax.plot(dx, [y for _, y in data], "--", color="grey", lw=1, label="data average")
        if len(xs_all) > 1 and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 10:
            ax.set_xscale("log")
        ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel({"obs_noise": "observation noise (std, in the data's std per dimension)",
                       "action_noise": "behaviour action noise (std) of the data"}.get(param, param))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    for ax in axes[0]:
        ax.legend(fontsize=6)
    return table, save_figure(fig, out, table, dpi=150)


def robustness(runs: list[dict], noise: list[float], episodes: int, out: str) -> tuple[list[dict], list[str]]:
    """Sensor noise at deployment: every finished run's final policy evaluated on the same `episodes` start
    states (seeds 10000 + k) at each observation-noise level (damo.evaluate's obs_noise, N(0, sigma^2) per
    dimension in units of the data's std, as damo.py --eval-only --obs-noise), drawn as in `sensitivity`."""
    import gymnasium as gym

    import damo

    rows, cache = [], {}
    for r in runs:
        if not r["finished"]:
            print(f"warning: {r['path']} has not finished; left out", file=sys.stderr)
            continue
        ag, ck = damo.load_agent(r["path"])
        env_id = ck["data"]["eval_env_id"]
        if env_id not in cache:  # one set of envs per environment, made once (evaluate resets them)
            cache[env_id] = [gym.make(env_id) for _ in range(episodes)]
        envs = cache[env_id]
        family = r["data"].get("env_family", r["env_id"].split("-")[0])
        for x in noise:
            rets = damo.evaluate(ag.actor, envs, 10_000, ck["obs_mean"], ck["obs_std"], "cpu", obs_noise=x)
            rows.append({"panel": r["env_id"], "variant": variant_label(r["args"], family), "x": x, "seed": r["seed"],
                         "y": float(damo.normalized_score(rets, ck["data"]).mean()),
                         "data_score": r["data"].get("data_score_mean")})
        print(f"{r['path']}: " + ", ".join(f"{t['x']:g}: {t['y']:.1f}" for t in rows[-len(noise):]), file=sys.stderr)
    if not rows:
        raise damo.DamoError("no finished run to evaluate (a run folder with results.json and checkpoint.pt)")
    return draw_against(rows, "obs_noise", f"normalised score ({episodes} episodes, final policy)", out)


def sensitivity_table(table: list[dict], param: str, what: str = "last-10") -> str:
    lines = [f"| dataset | variant | {param} | seeds | {what} |", "|---|---|---|---|---|"]
    lines += [f"| {t['panel']} | {t['variant']} | {t[param]:g} | {t['seeds']} | {t['mean']:.1f} +- {t['std']:.1f} |"
              for t in table]
    return "\n".join(lines)


def diagnose(run: str, out: str | None = None, n: int = 2000, episodes: int = 5, seed: int = 0) -> dict:
    import torch

    import damo

    ag, ck = damo.load_agent(run)
    a = damo.saved_args(ck)
    if ck["dynamics"] is None:
        raise damo.DamoError(f"{run} is a BC run: it has no dynamics model, critic or discriminator to diagnose")
    torch.manual_seed(seed)
    data, info, env = damo.load_offline(replace(a, download=False))  # the run's own episodes (--data-fraction ...)
    mean, std = ck["obs_mean"], ck["obs_std"]
    act_dim = data["actions"].shape[1]
    actor, dyn, disc, critic = ag.actor, ag.dynamics, ag.disc, ag.critic
    norm = lambda x: (torch.as_tensor(x, dtype=torch.float32) - mean) / std  # noqa: E731

    rng = np.random.default_rng(seed)
    i = rng.choice(len(data["rewards"]), n, replace=False)
    offline = {"obs": norm(data["observations"][i]), "act": torch.as_tensor(data["actions"][i]),
               "next_obs": norm(data["next_observations"][i])}
    term_fn = damo.termination_fn_for(info["env_family"], data)
    syn = damo.model_rollout(dyn, actor, offline["obs"], a.rollout_length, term_fn, mean, std)

    # real: the trained policy (deterministic, as evaluated) in the real env, with damo.py's own
    # evaluation and episode seeds (the run's first `episodes` evaluation episodes); discounted MC returns
    envs = damo.make_eval_envs(env, episodes)
    ep_seed = a.seed + 10_000

    def transitions(rec):  # the episodes' steps as normalised float32 tensors
        steps = [s for ep in rec for s in ep]
        return {"obs": norm(np.stack([s[0] for s in steps])), "act": torch.as_tensor(np.stack([s[1] for s in steps])).float(),
                "next_obs": norm(np.stack([s[2] for s in steps]))}

    rec = []
    returns = damo.evaluate(actor, envs, ep_seed, mean, std, "cpu", record=rec).tolist()
    real = transitions(rec)
    t_real = [t for ep in rec for t in range(len(ep))]
    with torch.no_grad():
        first = transitions([ep[:1] for ep in rec])
        q0 = critic(first["obs"], first["act"]).min(0).values.tolist()
    mc = [float(sum(a.gamma ** t * s[3] for t, s in enumerate(ep))) for ep in rec]
    target = critic_target_return(actor, critic, disc, a, ck, envs, ep_seed, mean, std, norm)

    # Does the critic know better actions than the actor takes? At every step pick, among pi(s) and
    # k - 1 Gaussian perturbations of it (std sigma), the action with the highest min_j Q_j, in the same
    # start states. A higher return than pi's own means the critic's ranking holds policy improvement
    # that the actor has not taken (e.g. held back by Eq. 7b); a lower one, that the critic misranks.
    # The control picks one of the perturbations at random: only a critic-picked return above it shows
    # that the ranking, not the noise itself, carries the improvement.
    k_cand, sigma = 32, 0.3

    def picker(by_critic: bool):
        gen = torch.Generator().manual_seed(seed)

        def pick(s):  # s [n, obs] float64 -> [n, act]
            s = s.float()
            mu_a = actor.act(s)  # [n, act]
            noise = sigma * torch.randn(len(s), k_cand - 1, act_dim, generator=gen)
            cand = torch.cat([mu_a[:, None], (mu_a[:, None] + noise).clamp(-1, 1)], 1)  # [n, k, act]
            if by_critic:
                q = critic(s[:, None].expand(-1, k_cand, -1).reshape(-1, s.shape[1]), cand.reshape(-1, act_dim))
                best = q.min(0).values.view(len(s), k_cand).argmax(1)
            else:
                best = torch.randint(1, k_cand, (len(s),), generator=gen)
            return cand[torch.arange(len(s)), best].double()
        return pick

    filtered = damo.evaluate(actor, envs, ep_seed, mean, std, "cpu", pick=picker(True)).tolist()
    perturbed = damo.evaluate(actor, envs, ep_seed, mean, std, "cpu", pick=picker(False)).tolist()

    def feats(d):
        return torch.cat([d["obs"], d["act"], d["next_obs"] - d["obs"]], -1).numpy()

    F_off, F_syn, F_real = feats(offline), feats(syn), feats(real)
    mu = F_off.mean(0)
    _, _, vt = np.linalg.svd(F_off - mu, full_matrices=False)  # PCA fitted on the offline data
    P = lambda f: (f - mu) @ vt[:2].T  # noqa: E731

    def mean_nn_dist(x, y):  # mean distance from each row of x to its nearest row of y (normalised units)
        x, y = torch.as_tensor(x[:2000]), torch.as_tensor(y[:4000])
        return float(torch.cdist(x, y).min(1).values.mean())

    with torch.no_grad():
        p = {name: float(torch.sigmoid(disc(d["obs"], d["act"], d["next_obs"])).mean())
             for name, d in (("offline", offline), ("synthetic", syn), ("real", real))}
    # synthetic states: the model's predicted s' (its s are offline states or earlier predictions)
    s_off, s_real, s_syn = offline["obs"].numpy(), real["obs"].numpy(), syn["next_obs"].numpy()
    # a combined dataset (medium-expert) is its sources' transitions in order: which source's states
    # does the trained policy visit? (share of real states whose nearest offline state comes from each)
    ends = np.cumsum(info.get("n_transitions_per_dataset") or [len(data["rewards"])])
    src = np.searchsorted(ends, i, side="right")
    nearest = torch.cdist(torch.as_tensor(s_real), torch.as_tensor(s_off)).argmin(1).numpy()
    early = np.asarray(t_real) < 100
    parts = {"all steps": np.ones_like(early), "first 100 steps": early, "later steps": ~early}
    visits = {f"{did} ({part})": float(np.mean(src[nearest[m]] == j))
              for j, did in enumerate(info["dataset_ids"]) for part, m in parts.items() if m.any()}
    stats = {
        "run": run, "embedding": "PCA (2 components) fitted on offline (s, a, s'-s), normalised obs",
        "n_offline": int(len(F_off)), "n_synthetic": int(len(F_syn)), "n_real": int(len(F_real)),
        "real_to_offline_state_nn_distance": mean_nn_dist(s_real, s_off),
        "synthetic_to_offline_state_nn_distance": mean_nn_dist(s_syn, s_off),
        "offline_to_offline_state_nn_distance": mean_nn_dist(s_off[: n // 2], s_off[n // 2:]),
        # the fair comparison (Fig. 3b): Q(s0, a0) against the return the critic estimates (critic_target_return)
        **target,
        # the deterministic policy's plain discounted return, and Q at its first action: not what Q estimates
        # when the entropy backup or Eq. 4's correction is on (kept to compare with older diagnostics)
        "q_deterministic_start_mean": float(np.mean(q0)), "plain_return_mean": float(np.mean(mc)),
        "disc_p_offline": p, "episodes": episodes, "real_return_mean_discounted": float(np.mean(mc)),
        "real_states_nearest_source": visits,
        "real_return_mean": float(np.mean(returns)), "real_returns": returns, "q_filtered_return_mean": float(np.mean(filtered)),
        "q_filtered": f"best of pi(s) and {k_cand - 1} perturbations (std {sigma}) by min_j Q_j, same start states",
        "random_perturbation_return_mean": float(np.mean(perturbed)),  # the control: one perturbation at random
    }
    out = out or os.path.join(run, "diagnostics")
    fig, ax = plt.subplots(1, 4, figsize=(20, 4.4))
    Po, Ps, Pr = P(F_off), P(F_syn[:4000]), P(F_real[:4000])
    ax[0].scatter(*Po.T, s=3, alpha=0.35, label="offline")
    ax[0].scatter(*Ps.T, s=3, alpha=0.35, label="synthetic")
    ax[0].set_title("(s, a, s') offline vs synthetic (PCA)")
    ax[1].scatter(*Pr.T, s=3, alpha=0.35, label="real", color="C2")
    ax[1].scatter(*Ps.T, s=3, alpha=0.35, label="synthetic", color="C1")
    ax[1].set_title("(s, a, s') real vs synthetic (PCA)")
    for x in ax[:2]:
        x.legend(markerscale=4)
    q_s, g_s = target["q_start"], target["target_returns"]
    ax[2].scatter(g_s, q_s)
    lim = [min(g_s + q_s), max(g_s + q_s)]
    ax[2].plot(lim, lim, "k--", lw=1, label="Q = its target")
    ax[2].set_xlabel(target["target"], fontsize=8)
    ax[2].set_ylabel("min_j Q_j(s0, a0), a0 ~ pi(s0)")
    ax[2].set_title(f"critic vs the return it estimates: mean over-estimation {stats['overestimation_mean']:.1f}",
                    fontsize=9)
    ax[2].legend()
    ax[3].bar(list(p), list(p.values()), color=["C0", "C1", "C2"])
    ax[3].set_ylim(0, 1)
    ax[3].set_title("discriminator: mean P(offline)")
    fig.suptitle(f"{os.path.basename(os.path.normpath(run))}: {info['dataset_ids']}", fontsize=9)
    fig.tight_layout()
    for ext in (".png", ".pdf"):
        fig.savefig(out + ext, dpi=100)
    plt.close(fig)
    with open(out + ".json", "w") as f:
        json.dump(stats, f, indent=2)
    return stats


# ----------------------------------------------------------------------------------------------------
# behaviours: which behaviour policy the actor follows and the critic prefers, over a run's course
# ----------------------------------------------------------------------------------------------------


def outside_share(ref_a: np.ndarray, ref_b: np.ndarray, x: np.ndarray, q: float = 95.0) -> tuple[float, float]:
    """How much of x lies outside the data: the threshold is the q-th percentile of the distances from each
    offline point of ref_a to its nearest neighbour in ref_b (two disjoint offline samples); returns the share
    of x's points farther than that from their nearest neighbour in ref_b, and the threshold."""
    import torch

    def nn_dist(u, v):
        return torch.cdist(torch.as_tensor(u, dtype=torch.float64), torch.as_tensor(v, dtype=torch.float64)).min(1).values.numpy()

    threshold = float(np.percentile(nn_dist(ref_a, ref_b), q))
    return float(np.mean(nn_dist(x, ref_b) > threshold)), threshold


def side_by_side(runs: list[dict], env_id: str, seeds: Sequence[int], out: str, n: int = 2000, episodes: int = 5) -> dict:
    """The paper's Fig. 1 for several methods at once: for each variant's runs on `env_id` with `seeds`, offline,
    synthetic (its policy rolled in its own model from the same offline states) and real (its deterministic
    policy in the real env, the run's own evaluation seeds) transitions (s, a, s' - s), in one embedding
    (PCA fitted on the offline sample, observations normalised with the data's statistics), a panel per
    method (its run of the first seed it has); per run and per method (mean and std over its seeds), the
    share of real and of synthetic transitions outside the data (outside_share), one threshold for all."""
    import gymnasium as gym
    import torch

    import damo

    chosen: dict = {}  # variant -> seed -> run
    for r in runs:
        if r["env_id"] == env_id and r["seed"] in seeds and r["finished"]:
            chosen.setdefault(r["variant"], {}).setdefault(r["seed"], r)
    if not chosen:
        raise damo.DamoError(f"no finished run of {env_id} with seed {' or '.join(map(str, seeds))} under the runs folder")
    first = damo.saved_args(damo.load_agent(next(iter(next(iter(chosen.values())).values()))["path"])[1])
    data, info, env = damo.load_offline(replace(first, download=False))
    mean = torch.as_tensor(data["observations"].mean(0))
    std = torch.as_tensor(data["observations"].std(0)).clamp_min(1e-3)  # prepare_data's statistics
    norm = lambda x: (torch.as_tensor(x, dtype=torch.float32) - mean) / std  # noqa: E731
    rng = np.random.default_rng(seeds[0])
    rows = rng.choice(len(data["rewards"]), 3 * n, replace=False)  # the sample shown, and two to set the threshold
    def offline_of(i):
        return {"obs": norm(data["observations"][i]), "act": torch.as_tensor(data["actions"][i]),
                "next_obs": norm(data["next_observations"][i])}

    def feats(d):
        return torch.cat([d["obs"], d["act"], d["next_obs"] - d["obs"]], -1).numpy()

    shown, ref_a, ref_b = (offline_of(rows[k * n:(k + 1) * n]) for k in range(3))
    F_off, F_a, F_b = feats(shown), feats(ref_a), feats(ref_b)
    mu = F_off.mean(0)
    _, _, vt = np.linalg.svd(F_off - mu, full_matrices=False)
    P = lambda f: (f - mu) @ vt[:2].T  # noqa: E731
    term_fn = damo.termination_fn_for(info["env_family"], data)

    def one_run(variant, r):
        torch.manual_seed(r["seed"])
        ag, ck = damo.load_agent(r["path"])
        a = damo.saved_args(ck)
        rec = []
        rets = damo.evaluate(ag.actor, damo.make_eval_envs(gym.make(info["eval_env_id"]), episodes), a.seed + 10_000,
                             ck["obs_mean"], ck["obs_std"], "cpu", record=rec)
        steps = [x for ep in rec for x in ep]
        F_real = feats({"obs": norm(np.stack([x[0] for x in steps])), "act": torch.as_tensor(np.stack([x[1] for x in steps])).float(),
                        "next_obs": norm(np.stack([x[2] for x in steps]))})
        real_out, threshold = outside_share(F_a, F_b, F_real)
        row = {"variant": variant, "seed": r["seed"], "run": os.path.basename(os.path.normpath(r["path"])),
               "real_outside": real_out, "n_real": len(F_real), "real_return_mean": float(np.mean(rets)),
               "synthetic_outside": None, "threshold": threshold}
        F_syn = None
        if ag.dynamics is not None:  # the run's own model and normalisation (the same data: the same statistics)
            with torch.no_grad():
                start = (shown["obs"] * std + mean - ck["obs_mean"]) / ck["obs_std"]
                syn = damo.model_rollout(ag.dynamics, ag.actor, start, a.rollout_length, term_fn, ck["obs_mean"], ck["obs_std"])
            raw = lambda z: z * ck["obs_std"] + ck["obs_mean"]  # noqa: E731
            F_syn = feats({"obs": norm(raw(syn["obs"])), "act": syn["act"], "next_obs": norm(raw(syn["next_obs"]))})
            row["synthetic_outside"] = outside_share(F_a, F_b, F_syn[:4000])[0]
        return row, F_syn, F_real

    per_run, table, panels = [], [], []
    for variant, by_seed in sorted(chosen.items()):
        mine = [one_run(variant, by_seed[s]) for s in seeds if s in by_seed]
        rs = [row for row, _, _ in mine]
        per_run += rs
        real, syn = [row["real_outside"] for row in rs], [row["synthetic_outside"] for row in rs if row["synthetic_outside"] is not None]
        table.append({"variant": variant, "seeds": [row["seed"] for row in rs], "n_real": sum(row["n_real"] for row in rs),
                      "real_outside": float(np.mean(real)), "real_outside_std": float(np.std(real)),
                      "synthetic_outside": float(np.mean(syn)) if syn else None,
                      "synthetic_outside_std": float(np.std(syn)) if syn else None,
                      "real_return_mean": float(np.mean([row["real_return_mean"] for row in rs])), "threshold": rs[0]["threshold"]})
        panels.append(mine[0])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.4), squeeze=False, sharex=True, sharey=True)
    for ax, (row, F_syn, F_real) in zip(axes[0], panels):
        ax.scatter(*P(F_off).T, s=3, alpha=0.3, color="0.6", label="offline")
        if F_syn is not None:
            ax.scatter(*P(F_syn[:4000]).T, s=3, alpha=0.3, color="C1", label="synthetic")
        ax.scatter(*P(F_real[:4000]).T, s=3, alpha=0.4, color="C2", label="real")
        ax.set_title(f"{row['variant']}, seed {row['seed']}: {100 * row['real_outside']:.1f}% of real transitions "
                     "outside the data", fontsize=9)
        ax.legend(markerscale=4, fontsize=8)
    fig.suptitle(f"{env_id}: (s, a, s' - s) in one embedding (PCA of the offline data)", fontsize=10)
    res = {"env_id": env_id, "seeds": list(seeds), "episodes": episodes, "n_offline": n,
           "outside": "share of transitions farther from their nearest offline neighbour than the 95th percentile of "
                      "offline-to-offline nearest-neighbour distances (two disjoint offline samples)",
           "methods": table, "runs": per_run}
    return {**res, "paths": save_figure(fig, out, res)}


def log_prob(actor, s, a):
    """log pi(a|s) of the tanh-Gaussian actor at given actions (Actor.sample's formula, u = atanh a)."""
    import torch

    mu, log_std = actor(s)
    u = torch.atanh(a.clamp(-1 + 1e-6, 1 - 1e-6))
    logp = (-0.5 * ((u - mu) / log_std.exp()) ** 2 - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)
    return logp - (2 * (np.log(2) - u - torch.nn.functional.softplus(-2 * u))).sum(-1)


def critic_target_return(actor, critic, disc, a, ck, envs, ep_seed, mean, std, norm) -> dict:
    """What the critic estimates, measured in the real env (a fair Fig. 3b). Its target (Eq. 6) is the soft
    return of the *stochastic* policy with the reward it was trained on: Q(s0, a0) = E[ sum_t gamma^t r~_t
    - alpha_ent * sum_{t>=1} gamma^t log pi(a_t|s_t) ], a_t ~ pi, with r~ = r + beta * clip(logit D) (Eq. 4, the
    reward of the synthetic rows, where the policy's own actions are) and the entropy term only with
    --backup-entropy. So the episodes here sample their actions (a0 included), the sums use the run's final
    alpha_ent, beta and discriminator, and Q is read at (s0, a0). A run with --no-backup-entropy and --beta 0
    compares its critic with the plain discounted return. Episodes end at 1,000 steps (the time limit), where
    the critic would bootstrap: the sum misses at most gamma^1000 of the value."""
    import torch

    import damo

    alpha_ent = float(torch.as_tensor(ck["log_alpha_ent"]).exp()) if a.backup_entropy else 0.0
    rec = []
    damo.evaluate(actor, envs, ep_seed, mean, std, "cpu", record=rec,
                  pick=lambda s: actor.sample(s.float())[0].double())  # torch's generator: seeded by diagnose
    q0, g = [], []
    with torch.no_grad():
        for ep in rec:
            s, s2 = norm(np.stack([x[0] for x in ep])), norm(np.stack([x[2] for x in ep]))
            act = torch.as_tensor(np.stack([x[1] for x in ep])).float()
            r = torch.as_tensor([x[3] for x in ep], dtype=torch.float64)
            bonus = a.beta * disc(s, act, s2).clamp(-a.logit_clip, a.logit_clip).double() if a.beta > 0 else 0.0
            ent = -alpha_ent * log_prob(actor, s, act).double()
            ent[0] = 0.0  # Q(s0, a0) holds no entropy term for a0 itself
            disc_t = a.gamma ** torch.arange(len(ep), dtype=torch.float64)
            g.append(float((disc_t * (r + bonus + ent)).sum()))
            q0.append(float(critic(s[:1], act[:1]).min(0).values))
    parts = ["soft return" if alpha_ent else "return", "of the sampling policy",
             f"r + {a.beta:g} clip(logit D)" if a.beta > 0 else "r", f"alpha_ent {alpha_ent:.3g}" if alpha_ent else ""]
    return {"target": f"discounted {parts[0]} {parts[1]}, reward {parts[2]}" + (f", {parts[3]}" if parts[3] else ""),
            "q_start": q0, "target_returns": g, "q_start_mean": float(np.mean(q0)), "target_return_mean": float(np.mean(g)),
            "overestimation_mean": float(np.mean(np.array(q0) - np.array(g))), "alpha_ent": alpha_ent, "beta": a.beta}


def checkpoints_of(path: str) -> list[str]:
    """A .pt file, or a run folder: its snapshots (damo.py --snapshot-every) in step order, else checkpoint.pt."""
    if path.endswith(".pt"):
        return [path]
    snaps = os.path.join(path, "snapshots")
    if os.path.isdir(snaps):
        found = sorted(os.path.join(snaps, f) for f in os.listdir(snaps) if re.fullmatch(r"step_\d+\.pt", f))
        if found:
            return found
    return [os.path.join(path, "checkpoint.pt")]


def behaviours(path: str, policies: list[str], out: str | None = None, n: int = 4000, start_steps: int = 50,
               episodes: int = 3, seed: int = 0) -> dict:
    """For a run trained on data made from known behaviour policies (make_dataset.py's .npz files): at
    offline states (each source dataset's, and the first `start_steps` steps of every episode, where the
    behaviours share their states), the actor's squared distance to each behaviour's mean action, the
    critic's min_j Q_j of each mean action and the share of states where it ranks each one highest, and
    Eq. 7b's keep rate on the data's own actions; and in `episodes` real episodes (the run's first
    evaluation episodes) which source's states the policy visits after its first 100 steps (nearest
    offline state). For every snapshot of the run, so that a run's course (a policy found and lost) can
    be read against its evaluations."""
    import torch

    import damo
    import make_dataset

    paths = checkpoints_of(path)
    _, ck = damo.load_agent(paths[0])
    a = damo.saved_args(ck)
    if ck["critic"] is None:
        raise damo.DamoError(f"{path} is a BC run: it has no critic; pass a DAMO run")
    if a.dataset_path:
        data, info, env = damo.load_d4rl_hdf5(a.dataset_path, a.env_id)
    else:
        data, info, env = damo.load_dataset(a.env_id, download=False)
    try:
        weights = {os.path.basename(p).removesuffix(".npz"): make_dataset.load_policy_weights(p, env) for p in policies}
    except make_dataset.InputError as e:
        raise damo.DamoError(str(e)) from None
    obs, next_obs = data["observations"], data["next_observations"]
    # step of each row within its episode: an episode starts where a row's state is not the previous next state
    new_ep = np.ones(len(obs), dtype=bool)
    new_ep[1:] = np.any(obs[1:] != next_obs[:-1], axis=1)
    starts = np.flatnonzero(new_ep)
    t = np.arange(len(obs)) - starts[np.searchsorted(starts, np.arange(len(obs)), side="right") - 1]
    ends = np.cumsum(info.get("n_transitions_per_dataset") or [len(obs)])
    src = np.searchsorted(ends, np.arange(len(obs)), side="right")
    rng = np.random.default_rng(seed)
    groups = {f"{did} states": np.flatnonzero(src == j) for j, did in enumerate(info["dataset_ids"])}
    groups[f"first {start_steps} steps"] = np.flatnonzero(t < start_steps)

    mean, std = ck["obs_mean"], ck["obs_std"]
    probe = {}
    for g, rows in groups.items():
        i = rng.choice(rows, min(n, len(rows)), replace=False)
        probe[g] = {"s": (torch.as_tensor(obs[i]) - mean) / std, "a": torch.as_tensor(data["actions"][i]),
                    "beh": {k: torch.as_tensor(make_dataset.NumpyPolicy(w, deterministic=True, rng=None)(obs[i].astype(np.float64))).float()
                            for k, w in weights.items()}}  # each behaviour's mean action tanh(mu)
    # the real episodes' states: which source's states does the policy visit after its first 100 steps?
    ref_i = rng.choice(len(obs), min(5000, len(obs)), replace=False)
    ref_s, ref_src = (torch.as_tensor(obs[ref_i]) - mean) / std, src[ref_i]
    envs = damo.make_eval_envs(env, episodes)
    rows_out = []
    for p in paths:
        ag, ck = damo.load_agent(p)
        row = {"checkpoint": p, "step": int(ck["global_step"]), "groups": {}}
        rec = []
        rets = damo.evaluate(ag.actor, envs, a.seed + 10_000, mean, std, "cpu", record=rec)
        later = [st[0] for ep in rec for st in ep[100:]]
        row["real_return_mean"] = float(rets.mean())
        if later:
            near = ref_src[torch.cdist((torch.as_tensor(np.stack(later)).float() - mean) / std, ref_s).argmin(1).numpy()]
            row["real_later_states_nearest"] = {did: float(np.mean(near == j)) for j, did in enumerate(info["dataset_ids"])}
        with torch.no_grad():
            for g, d in probe.items():
                s, mu = d["s"], ag.actor.act(d["s"])
                q = lambda act: ag.critic(s, act).min(0).values  # noqa: E731
                qb = torch.stack([q(b) for b in d["beh"].values()])  # [policies, n]
                best = qb.argmax(0)
                row["groups"][g] = {
                    "n": len(s), "eq7b_keep": float((q(d["a"]) > q(mu)).float().mean()),
                    **{f"actor_dist_to_{k}": float(((mu - b) ** 2).sum(-1).mean()) for k, b in d["beh"].items()},
                    **{f"q_of_{k}": float(qb[j].mean()) for j, k in enumerate(d["beh"])},
                    **{f"critic_prefers_{k}": float((best == j).float().mean()) for j, k in enumerate(d["beh"])},
                }
        rows_out.append(row)
    result = {"run": path, "policies": policies, "dataset_ids": info["dataset_ids"], "start_steps": start_steps,
              "label": variant_label(ck["args"], info["env_family"]), "seed": a.seed, "checkpoints": rows_out}
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.dirname(path)) if "snapshots" in path \
        else os.path.dirname(path)
    out = out or os.path.join(folder, "behaviours")
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    if len(rows_out) > 1:
        plot_behaviours(result, folder, out)
    return result


def plot_behaviours(result: dict, folder: str, out: str):
    steps = [r["step"] for r in result["checkpoints"]]
    names = [os.path.basename(p).removesuffix(".npz") for p in result["policies"]]
    first = f"first {result['start_steps']} steps"
    G = lambda g, key: [r["groups"][g][key] for r in result["checkpoints"]]  # noqa: E731
    fig, ax = plt.subplots(1, 4, figsize=(20, 4.2))
    ev = os.path.join(folder, "eval.csv")
    if os.path.isfile(ev):
        rows = list(csv.DictReader(open(ev)))
        ax[0].plot([int(r["global_step"]) for r in rows], [float(r["normalized_score"]) for r in rows], "k.-",
                   label="evaluation score")
    ax[0].set_title("evaluation; real states after step 100\nnearest each source's (x 100)")
    for j, did in enumerate(result["dataset_ids"]):
        share = [100 * r.get("real_later_states_nearest", {}).get(did, np.nan) for r in result["checkpoints"]]
        ax[0].plot(steps, share, color=f"C{j}", ls="--", label=f"{did}")
    ax[0].legend(fontsize=7)
    for j, k in enumerate(names):
        ax[1].plot(steps, G(first, f"actor_dist_to_{k}"), color=f"C{j}", label=f"{k}, {first}")
        for g in result["checkpoints"][0]["groups"]:
            if g != first:
                ax[1].plot(steps, G(g, f"actor_dist_to_{k}"), color=f"C{j}", ls=":", lw=1)
        ax[2].plot(steps, G(first, f"critic_prefers_{k}"), color=f"C{j}", label=k)
    ax[1].set_title("actor's ||mu(s) - behaviour's mean action||^2\n(solid: first steps; dotted: each source's states)")
    ax[2].set_title(f"critic ranks this behaviour's action highest\n(share of states, {first})")
    ax[2].set_ylim(0, 1)
    for j, g in enumerate(result["checkpoints"][0]["groups"]):
        ax[3].plot(steps, G(g, "eq7b_keep"), color=f"C{j}", label=g)
    ax[3].set_title("Eq. 7b keep rate of the data's actions")
    ax[3].set_ylim(0, 1)
    for x in ax:
        x.set_xlabel("gradient step")
    for x in ax[1:]:
        x.legend(fontsize=7)
    fig.suptitle(f"{result['label']}, seed {result['seed']}: {', '.join(result['dataset_ids'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# the data: what separates its behaviour policies, as a discounted critic sees it
# ----------------------------------------------------------------------------------------------------


def data_stats(env_id: str, gamma: float = 0.99) -> list[dict]:
    """Per source dataset of --env-id (two for a combined medium-expert): episodes, steps, episode
    length, undiscounted return, reward per step, share of episodes that terminate (fall) rather than
    time out, and the discounted return from t = 0 at `gamma`. A critic trained with discount gamma
    separates two behaviour policies at the start state only by the last number: if their rewards per
    step are equal and only their episode lengths differ, gamma^length hides the difference."""
    import minari

    import damo

    ids, _ = damo.dataset_ids_for(env_id, download=False)
    rows = []
    for did in ids:
        ds = minari.load_dataset(did)
        lens, rets, g0, term = [], [], [], []
        for ep in ds.iterate_episodes():
            r = np.asarray(ep.rewards, dtype=np.float64)
            lens.append(len(r)), rets.append(r.sum()), term.append(bool(np.asarray(ep.terminations)[-1]))
            g0.append(float((r * gamma ** np.arange(len(r))).sum()))
        lens, rets, g0 = map(np.asarray, (lens, rets, g0))
        rows.append({"dataset": did, "episodes": len(lens), "steps": int(lens.sum()),
                     "length_mean": float(lens.mean()), "return_mean": float(rets.mean()),
                     "return_std": float(rets.std()), "reward_per_step": float(rets.sum() / lens.sum()),
                     "terminated_share": float(np.mean(term)), "gamma": gamma,
                     "discounted_return_t0_mean": float(g0.mean()), "discounted_return_t0_std": float(g0.std())})
    return rows


def data_table(rows: list[dict]) -> str:
    lines = ["| dataset | episodes | steps | length | return | reward/step | terminated | "
             f"discounted return from t=0 (gamma {rows[0]['gamma']}) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['episodes']} | {r['steps']} | {r['length_mean']:.0f} | "
                     f"{r['return_mean']:.1f} +- {r['return_std']:.1f} | {r['reward_per_step']:.2f} | "
                     f"{100 * r['terminated_share']:.0f}% | {r['discounted_return_t0_mean']:.1f} +- "
                     f"{r['discounted_return_t0_std']:.1f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# the field's aggregate statistics (Agarwal et al., NeurIPS 2021, arXiv 2108.13264), on held-out scores
# ----------------------------------------------------------------------------------------------------


def iqm(*per_dataset) -> float:
    """Interquartile mean of the runs' scores pooled over datasets: the mean of the middle 50% (scipy's
    trim_mean cuts int(0.25 n) scores at each end)."""
    from scipy import stats

    return float(stats.trim_mean(np.concatenate(per_dataset), 0.25))


def probability_of_improvement(*xy) -> float:
    """P(X > Y): the first half of the arguments are X's scores per dataset, the second half Y's on the same
    datasets. Per dataset, the share of (x, y) run pairs with x > y (ties count 1/2), averaged over datasets."""
    m = len(xy) // 2
    per = [np.mean((x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])) for x, y in zip(xy[:m], xy[m:])]
    return float(np.mean(per))


def stratified_interval(statistic, samples: list[np.ndarray], resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of `statistic` over stratified bootstrap resamples: each dataset's runs are
    resampled with replacement within that dataset (scipy.stats.bootstrap with one sample per dataset,
    unpaired). NaN where a dataset has a single run (nothing to resample)."""
    from scipy import stats

    if any(len(x) < 2 for x in samples):
        return float("nan"), float("nan")
    res = stats.bootstrap(samples, statistic, n_resamples=resamples, confidence_level=0.95, method="percentile",
                          vectorized=False, paired=False, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def recorded_runs(path: str) -> list[dict]:
    """The held-out scores an earlier `plot.py aggregate` wrote into its JSON (`per_dataset`: per dataset and
    variant the runs' scores, their seeds and last-10s), as runs for `aggregate`: sweeps run on other machines
    or at other times join the run folders at hand without their folders."""
    import damo

    try:
        with open(path) as f:
            rows = json.load(f)["per_dataset"]
        runs = []
        for row in rows:
            n = len(row["scores"])
            seeds, last10 = row.get("run_seeds") or [None] * n, row.get("last10") or [None] * n
            if len(seeds) != n or len(last10) != n:
                raise ValueError(f"{row['dataset']} {row['variant']}: {n} scores but {len(seeds)} seeds, {len(last10)} last-10s")
            runs += [{"path": f"{path} ({row['dataset']}, {row['variant']})", "env_id": row["dataset"], "variant": row["variant"],
                      "seed": sd, "finished": True, "heldout": {"normalized_score": float(x)}, "last10": l10}
                     for x, sd, l10 in zip(row["scores"], seeds, last10)]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise damo.DamoError(f"{path} is not the JSON of a `plot.py aggregate` (per_dataset rows with scores): "
                             f"{type(e).__name__}: {e}") from None
    return runs


def aggregate(runs: list[dict], resamples: int = 2000, seed: int = 0) -> dict:
    """From each finished run's held-out score (run folders, or rows of an earlier aggregate's JSON): per
    dataset and variant the mean and std over seeds; per variant the IQM over its datasets with its interval;
    for every two variants that share datasets, the probability that the first beats the second, with its
    interval."""
    import damo

    scores: dict = {}
    last10: dict = {}  # beside it in the JSON: the same runs' last-10 of the training evaluations
    where: dict = {}  # (dataset, variant) -> [(seed, path)] of its runs, in the order of `scores`
    missing = [r["path"] for r in runs if r["finished"] and not r["heldout"]]
    for r in runs:
        if r["heldout"]:
            # a run counted twice (the same sweep given twice, a recorded JSON beside its own folders) would
            # weigh double in every statistic; a recorded row without seeds clashes with any run of its row
            key = (r["env_id"], r["variant"])
            clash = [p for sd, p in where.get(key, []) if p != r["path"] and (sd == r["seed"] or None in (sd, r["seed"]))]
            if clash:
                raise damo.DamoError(f"{r['env_id']} {r['variant']} seed {r['seed']} is given twice: {clash[0]} and "
                                     f"{r['path']}; pass each run once")
            where.setdefault(key, []).append((r["seed"], r["path"]))
            scores.setdefault(r["variant"], {}).setdefault(r["env_id"], []).append(r["heldout"]["normalized_score"])
            last10.setdefault(key, []).append(r["last10"] if "last10" in r else float(r["score"][-10:].mean()))
    if missing:
        print(f"warning: {len(missing)} finished runs have no held-out score and are left out (damo.py --eval-only "
              f"RUN --heldout records it), e.g. {missing[0]}", file=sys.stderr)
    if not scores:
        raise damo.DamoError("no run under RUNS has a held-out score (results.json 'heldout'): finished runs record one; "
                             "older runs get theirs with damo.py --eval-only RUN --heldout")
    variants = sorted(scores, key=variant_key)
    envs = sorted({e for v in scores.values() for e in v}, key=dataset_key)
    per_dataset = [{"dataset": e, "variant": v, "seeds": len(scores[v][e]), "mean": float(np.mean(scores[v][e])),
                    "std": float(np.std(scores[v][e])), "scores": scores[v][e], "run_seeds": [sd for sd, _ in where[e, v]], "last10": last10[e, v]}
                   for e in envs for v in variants if e in scores[v]]
    # the IQMs compare variants only on the datasets every variant has: a variant with more (or easier)
    # datasets would otherwise rank on those
    common = [e for e in envs if all(e in scores[v] for v in variants)]
    left = [e for e in envs if e not in common]
    if left:
        print(f"warning: the IQMs leave out {', '.join(left)} (not run by every variant)" if common else
              "warning: no dataset was run by every variant: each IQM is over that variant's own datasets, "
              "which do not compare", file=sys.stderr)
    overall = []
    for v in variants:
        samples = [np.asarray(scores[v][e]) for e in (common or envs) if e in scores[v]]
        lo, hi = stratified_interval(iqm, samples, resamples, seed)
        overall.append({"variant": v, "datasets": len(samples), "runs": int(sum(map(len, samples))),
                        "iqm": iqm(*samples), "low": lo, "high": hi})
    improvement = []  # each pair once, the variant listed first as X (P(Y > X) = 1 - P(X > Y))
    for i, x in enumerate(variants):
        for y in variants[i + 1:]:
            shared = [e for e in envs if e in scores[x] and e in scores[y]]
            if not shared:
                continue
            xy = [np.asarray(scores[x][e]) for e in shared] + [np.asarray(scores[y][e]) for e in shared]
            lo, hi = stratified_interval(probability_of_improvement, xy, resamples, seed)
            improvement.append({"x": x, "y": y, "datasets": len(shared), "p": probability_of_improvement(*xy),
                                "low": lo, "high": hi})
    return {"per_dataset": per_dataset, "iqm": overall, "improvement": improvement, "resamples": resamples,
            "score": "held-out normalised score (results.json 'heldout')", "interval": "95% stratified bootstrap, percentile"}


def aggregate_tables(agg: dict) -> str:
    def ci(t):
        return f"[{t['low']:.1f}, {t['high']:.1f}]" if np.isfinite(t["low"]) else "(one seed: no interval)"

    variants = [t["variant"] for t in agg["iqm"]]
    cells: dict = {}
    for t in agg["per_dataset"]:
        cells.setdefault(t["dataset"], {})[t["variant"]] = t
    lines = ["held-out normalised score, mean +- std over seeds (seeds); bold: the highest mean of the row", "",
             "| dataset | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for env, row in cells.items():
        best = max(t["mean"] for t in row.values()) if len(row) > 1 else None
        text = {v: f"{t['mean']:.1f} +- {t['std']:.1f} ({t['seeds']})" for v, t in row.items()}
        lines.append(f"| {env} | " + " | ".join("" if v not in row else f"**{text[v]}**" if row[v]["mean"] == best
                                                 else text[v] for v in variants) + " |")
    lines += ["", "| variant | datasets | runs | IQM | 95% CI |", "|---|---|---|---|---|"]
    lines += [f"| {t['variant']} | {t['datasets']} | {t['runs']} | {t['iqm']:.1f} | {ci(t)} |" for t in agg["iqm"]]
    if agg["improvement"]:
        lines += ["", "| P(X > Y) | X | Y | datasets | 95% CI |", "|---|---|---|---|---|"]
        lines += [f"| {t['p']:.2f} | {t['x']} | {t['y']} | {t['datasets']} | "
                  + (f"[{t['low']:.2f}, {t['high']:.2f}]" if np.isfinite(t["low"]) else "(one seed)") + " |"
                  for t in agg["improvement"]]
    return "\n".join(lines)


def plot_aggregate(agg: dict, out: str) -> list[str]:
    """The field's interval figure: one row per variant, its IQM and 95% interval; beside it, P(X > Y)."""
    rows, pairs = agg["iqm"], agg["improvement"]
    fig, axes = plt.subplots(1, 2 if pairs else 1, figsize=(11 if pairs else 5.5, 0.6 * max(len(rows), len(pairs)) + 1.6),
                             squeeze=False)
    ax = axes[0, 0]
    for i, t in enumerate(rows):
        if np.isfinite(t["low"]):
            ax.plot([t["low"], t["high"]], [i, i], lw=6, alpha=0.4, color=f"C{i}", solid_capstyle="butt")
        ax.plot(t["iqm"], i, "|", ms=16, mew=2, color=f"C{i}")
    ax.set_yticks(range(len(rows)), [f"{t['variant']} ({t['datasets']} datasets)" for t in rows])
    ax.set_xlabel("IQM of held-out normalised score (95% stratified bootstrap CI)")
    ax.invert_yaxis()  # the tables' order, top to bottom
    if pairs:
        ax = axes[0, 1]
        for i, t in enumerate(pairs):
            if np.isfinite(t["low"]):
                ax.plot([t["low"], t["high"]], [i, i], lw=6, alpha=0.4, color="C0", solid_capstyle="butt")
            ax.plot(t["p"], i, "|", ms=16, mew=2, color="C0")
        ax.axvline(0.5, color="k", ls="--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_yticks(range(len(pairs)), [f"P({t['x']} > {t['y']})" for t in pairs])
        ax.set_xlabel("probability of improvement (95% CI)")
        ax.invert_yaxis()
    return save_figure(fig, out, agg)


# ----------------------------------------------------------------------------------------------------
# The command line: one dataclass per command (tyro subcommands); each field's docstring is its --help
# ----------------------------------------------------------------------------------------------------


def _pos(metavar: str, help: str):
    """A positional argument shown as METAVAR in the usage line."""
    return tyro.conf.arg(metavar=metavar, help=help)


def _out_dir_writable(out: str):
    import damo

    damo.check_writable(os.path.dirname(os.path.abspath(out)), "--out")


def _runs_folder(root: str) -> list[dict]:
    import damo

    if not os.path.isdir(root):
        raise damo.DamoError(f"the runs folder {root} does not exist; pass the --runs-dir your runs were written to")
    return find_runs(root)


def _beside(root: str, name: str) -> str:
    """RUNS/../NAME: a sweep's figures sit beside its runs folder."""
    return os.path.join(os.path.dirname(os.path.abspath(root.rstrip("/"))), name)


@dataclass
class Curves:
    """Learning curves over seeds from every run folder under RUNS: a PNG and a PDF, and a markdown table of
    final, last-10 and best scores on stdout (`python plot.py RUNS` is the same command)."""

    runs: Annotated[tyro.conf.Positional[str], _pos("RUNS", "folder that holds run folders (searched recursively)")] = "runs"
    out: str = "curves"
    """output path without extension (PNG and PDF are written)"""
    band: Literal["std", "ci95"] = "std"
    """shaded band: +- std over seeds, or a 95% bootstrap interval of the mean"""
    metric: Literal["score", "return"] = "score"
    """normalised score or raw return on the y axis"""

    def run(self) -> int:
        import damo

        runs = _runs_folder(self.runs)
        _out_dir_writable(self.out)
        if not runs:
            raise damo.DamoError(f"no readable runs under {self.runs} (a run folder holds config.json and eval.csv "
                                 f"with at least one evaluation)")
        paths = plot_curves(runs, self.out, self.band, self.metric)
        print(summary_table(runs))
        print(f"\nwrote {', '.join(paths)}", file=sys.stderr)
        return 0


@dataclass
class Diagnose:
    """The paper's Figs. 1, 3b and 4 for one trained run (its checkpoint.pt): offline, synthetic and real
    (s, a, s' - s) embedded by PCA, Q(s0, a0) against the return the critic estimates (the soft discounted
    return, with the reward it was trained on, of 5 real episodes of its sampling policy), the classifier's
    P(offline) on each set, which source dataset's states the policy visits, and the return when the critic
    picks each action. Writes RUN/diagnostics.{png,pdf,json}."""

    run_dir: Annotated[tyro.conf.Positional[str], _pos("RUN", "a DAMO run folder (or its checkpoint.pt)")]

    def run(self) -> int:
        print(json.dumps(diagnose(self.run_dir), indent=2))
        return 0


@dataclass
class Behaviours:
    """For a run on data made by make_dataset.py from these behaviour policies: at the data's states (each
    source's, and the first 50 steps of every episode) the actor's distance to each behaviour's mean action,
    which one the critic ranks highest, and Eq. 7b's keep rate; which source's states 3 real episodes visit
    after their first 100 steps; for every snapshot of the run (damo.py --snapshot-every), else its
    checkpoint. Writes RUN/behaviours.json and, with snapshots, behaviours.png."""

    run_dir: Annotated[tyro.conf.Positional[str], _pos("RUN", "a DAMO run folder")]
    policies: Annotated[tyro.conf.Positional[tuple[str, ...]], _pos("POLICY.npz", "the behaviour policies (make_dataset.py's .npz files), one or more")]

    def run(self) -> int:
        import damo

        if not self.policies:
            raise damo.DamoError("pass at least one behaviour policy (.npz) after the run folder")
        res = behaviours(self.run_dir, list(self.policies))
        print(json.dumps(res["checkpoints"][-1], indent=2))
        return 0


@dataclass
class Sensitivity:
    """The last-10 score against one setting's value over the runs under RUNS: SETTING is a damo.py flag name
    (alpha, data_fraction, data_episodes, ...) or action_noise (the behaviour data's noise, from make_dataset.py
    --action-noise). One panel per dataset, mean +- std over seeds with every seed, a variant run at one value
    only (BC) as a line, the data's average as a dashed line. Writes PATH.{png,pdf,json} and prints a table."""

    runs: Annotated[tyro.conf.Positional[str], _pos("RUNS", "folder of runs (searched recursively)")]
    setting: Annotated[tyro.conf.Positional[str], _pos("SETTING", "the setting on the x axis")]
    out: Optional[str] = None
    """output path without extension (default: RUNS/../sensitivity_SETTING)"""

    def run(self) -> int:
        out = self.out or _beside(self.runs, f"sensitivity_{self.setting}")
        runs = _runs_folder(self.runs)
        _out_dir_writable(out)
        table, paths = sensitivity(runs, self.setting, out)
        print(sensitivity_table(table, self.setting))
        print(f"\nwrote {', '.join(paths)}", file=sys.stderr)
        return 0


@dataclass
class Robustness:
    """Sensor noise at deployment: each finished run's final policy under RUNS evaluated on the same episodes
    (start seeds 10000 + k, damo.py --eval-only --seed 0's) at each level of Gaussian noise on what it
    observes (in units of the data's std per dimension; damo.py --eval-only --obs-noise). One panel per
    dataset, score against the noise per variant, mean +- std over seeds. Writes PATH.{png,pdf,json} and a
    table."""

    runs: Annotated[tyro.conf.Positional[str], _pos("RUNS", "folder of finished runs (searched recursively)")]
    noise: tuple[float, ...] = (0.0, 0.1, 0.2, 0.5, 1.0)
    """noise levels (std in units of the data's std), e.g. --noise 0 0.1 0.5"""
    episodes: int = 50
    """episodes per policy and level"""
    out: Optional[str] = None
    """output path without extension (default: RUNS/../robustness)"""

    def run(self) -> int:
        import damo

        if not self.noise or any(not np.isfinite(v) or v < 0 for v in self.noise) or self.episodes < 1:
            raise damo.DamoError(f"--noise {' '.join(map(str, self.noise))} / --episodes {self.episodes}: noise levels "
                                 f"must be >= 0 and finite, episodes >= 1")
        out = self.out or _beside(self.runs, "robustness")
        runs = _runs_folder(self.runs)
        _out_dir_writable(out)
        table, paths = robustness(runs, sorted(set(self.noise)), self.episodes, out)
        print(sensitivity_table(table, "obs_noise", f"score ({self.episodes} episodes)"))
        print(f"\nwrote {', '.join(paths)}", file=sys.stderr)
        return 0


@dataclass
class DataTable:
    """Per source dataset of a local Minari dataset (e.g. hopper-medium-expert): episodes, length, return,
    reward per step, share terminated and the discounted return from the start at GAMMA."""

    env_id: Annotated[tyro.conf.Positional[str], _pos("ENV_ID", "a damo.py --env-id")]
    gamma: Annotated[tyro.conf.Positional[float], _pos("GAMMA", "discount of the return from the start")] = 0.99

    def run(self) -> int:
        print(data_table(data_stats(self.env_id, self.gamma)))
        return 0


@dataclass
class Aggregate:
    """The field's statistics (Agarwal et al. 2021) from the held-out scores of the runs under RUNS: per dataset
    each variant's mean +- std over seeds; over datasets the interquartile mean (IQM) of normalised scores with
    a 95% stratified bootstrap interval (runs resampled within each dataset), and the probability that one
    variant beats another, with its interval. Prints markdown tables; writes PATH.{png,pdf,json}. RUNS may also
    name the JSON of an earlier aggregate: its runs' scores join the folders' (sweeps run on other machines or
    at other times; a run given twice is refused)."""

    runs: Annotated[tyro.conf.Positional[str], _pos("RUNS", "folder of runs (searched recursively), or the JSON an "
                                                           "earlier aggregate wrote")]
    more: Annotated[tyro.conf.Positional[tuple[str, ...]], _pos("[MORE ...]", "more folders of runs or JSONs")] = ()
    resamples: int = 2000
    """bootstrap resamples"""
    seed: int = 0
    """seed of the bootstrap"""
    out: Optional[str] = None
    """output path without extension (default: RUNS/../aggregate)"""
    variants: Optional[tuple[str, ...]] = None
    """only these variants, named as the tables name them (e.g. DAMO BC; any case); default: every variant.
    The IQMs are over the datasets every listed variant has, so an ablation or a peer run on fewer datasets
    in the same folder is left out by listing the others"""

    def run(self) -> int:
        import damo

        if self.resamples < 100:
            raise damo.DamoError(f"--resamples {self.resamples}: pass at least 100 (the field uses 2,000 or more)")
        out = self.out or _beside(self.runs, "aggregate")
        inputs = (self.runs, *self.more)
        if len({os.path.realpath(p) for p in inputs}) < len(inputs):
            raise damo.DamoError(f"{' '.join(inputs)}: a folder or JSON is given twice; pass each once")
        runs = [r for path in inputs for r in (recorded_runs(path) if path.endswith(".json") else _runs_folder(path))]
        if self.variants:
            found = sorted({r["variant"] for r in runs}, key=variant_key)
            unknown = [v for v in self.variants if v.lower() not in {f.lower() for f in found}]
            if unknown:
                raise damo.DamoError(f"--variants {' '.join(unknown)}: no run under {' '.join(inputs)} is of that variant; "
                                     f"its runs' variants are: {', '.join(found) or 'none'}")
            wanted = {v.lower() for v in self.variants}
            runs = [r for r in runs if r["variant"].lower() in wanted]
        _out_dir_writable(out)
        agg = aggregate(runs, self.resamples, self.seed)
        print(aggregate_tables(agg))
        print(f"\nwrote {', '.join(plot_aggregate(agg, out))}", file=sys.stderr)
        return 0


@dataclass
class SideBySide:
    """The paper's Fig. 1 side by side: for the finished runs under RUNS on one dataset with the given seeds (of
    each variant: DAMO, MOPO, MOBILE, ...), offline, synthetic and real (s, a, s' - s) in one shared embedding, a
    panel per method, and per method the share of real (and synthetic) transitions outside the data: farther
    from their nearest offline neighbour than the 95th percentile of offline-to-offline distances. Writes
    PATH.{png,pdf,json} and prints a table."""

    runs: Annotated[tyro.conf.Positional[str], _pos("RUNS", "folder of runs (searched recursively)")]
    env_id: str = "hopper-medium-expert"
    """the dataset (the runs' --env-id)"""
    seeds: tuple[int, ...] = (0,)
    """the runs' seeds: each method's numbers are the mean (and std) over those it has; its panel shows the first"""
    episodes: int = 5
    """real episodes per run"""
    out: Optional[str] = None
    """output path without extension (default: RUNS/../side_by_side_ENV_ID)"""

    def run(self) -> int:
        out = self.out or _beside(self.runs, f"side_by_side_{self.env_id.replace('/', '-')}")
        runs = _runs_folder(self.runs)
        _out_dir_writable(out)
        res = side_by_side(runs, self.env_id, self.seeds, out, episodes=self.episodes)
        def pct(t, key):  # a share, with its std over seeds when there are several
            if t[key] is None:
                return "(no model)"
            return f"{100 * t[key]:.1f}%" + (f" +- {100 * t[key + '_std']:.1f}" if len(t["seeds"]) > 1 else "")

        print("| method | seeds | real transitions outside the data (transitions) | synthetic outside | real return (deterministic) |")
        print("|---|---|---|---|---|")
        for t in res["methods"]:
            print(f"| {t['variant']} | {', '.join(map(str, t['seeds']))} | {pct(t, 'real_outside')} ({t['n_real']}) | "
                  f"{pct(t, 'synthetic_outside')} | {t['real_return_mean']:.1f} |")
        print(f"\nwrote {', '.join(res['paths'])}", file=sys.stderr)
        return 0


COMMANDS = {"curves": Curves, "aggregate": Aggregate, "side-by-side": SideBySide, "diagnose": Diagnose, "behaviours": Behaviours, "sensitivity": Sensitivity,
            "robustness": Robustness, "data": DataTable}


def main(argv: list[str]) -> int:
    """`plot.py COMMAND ...`; `plot.py RUNS ...` is `plot.py curves RUNS ...`. tyro answers bad arguments
    (exit status 2); a problem with the runs or data is one `error:` line (exit status 2)."""
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv = ["curves", *argv]
    command = tyro.extras.subcommand_cli_from_dict(COMMANDS, prog="plot.py", args=argv,
                                                   description=__doc__.split("\n\n")[0])
    import damo  # after parsing: --help and tyro's errors answer without loading torch (seconds)

    try:
        return command.run()
    except (damo.DamoError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
