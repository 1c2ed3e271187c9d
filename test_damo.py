"""Tests for damo.py, in the file's order (data, networks, losses, update, rollouts and evaluation, the
CLI, plot.py, long runs). Run: pytest -q test_damo.py (all), pytest -q -m "not slow" test_damo.py (quick).
Fixtures and helpers (minari_root, e2e_run, run_cli, flags) are in conftest.py."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import damo

import make_dataset
from conftest import HERE, OFFLINE_ENV, POLICIES, build, error_line, flags, in_own_network_namespace, run_cli, run_many

TINY = flags()  # the tiny run's flags (conftest.TINY) as a CLI list


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def test_load_dataset_combines_medium_expert(minari_root):
    data, info, env = damo.load_dataset("hopper-medium-expert", download=False)
    assert info["dataset_ids"] == ["mujoco/hopper/medium-v0", "mujoco/hopper/expert-v0"]
    assert info["n_transitions"] == 12000 == len(data["rewards"])
    assert data["observations"].shape == (12000, 11) and data["actions"].shape == (12000, 3)
    assert env.spec.id == "Hopper-v5"
    # bootstrap mask = terminations: every terminal row is a real fall of Hopper-v5
    term = data["terminals"].astype(bool)
    assert term.any()
    assert damo.hopper_termination(torch.as_tensor(data["next_observations"][term])).all()
    # next_observations continue the episode: s'_t == s_{t+1} wherever the episode did not end
    inside = np.flatnonzero(~term[:-1])[:200]
    cont = [i for i in inside if np.allclose(data["next_observations"][i], data["observations"][i + 1])]
    assert len(cont) >= 190  # all but the few episode boundaries that are truncations
    # D4RL reference returns, labelled approximate on v5 data
    assert "approximate" in info["ref_source"]
    assert damo.normalized_score(3234.3, info) == pytest.approx(100.0)


def test_make_dataset_mix_of_sources(tmp_path, monkeypatch):
    """--mix: sources rolled one after the other into one Minari dataset, episode ids in order, each
    source's steps as asked; a malformed item is refused with its text."""
    import minari

    import make_dataset

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    mix = ("random:300", f"{POLICIES / 'hopper-medium.npz'}:500")
    ds, returns = make_dataset.make_dataset(make_dataset.Args(env_id="Hopper-v5", dataset_id="mujoco/hopper/mixtest-v0",
                                                              mix=mix, seed=0))
    assert ds.total_steps == 800
    eps = list(minari.load_dataset("mujoco/hopper/mixtest-v0").iterate_episodes())
    assert [e.id for e in eps] == list(range(len(eps))) and len(eps) == len(returns)
    lengths = np.cumsum([len(e.rewards) for e in eps])
    assert 300 in lengths  # the random source ends exactly at its 300 steps, then the policy's episodes
    k = int(np.searchsorted(lengths, 300))
    assert np.mean(returns[: k + 1]) < np.mean(returns[k + 1:])  # random actions fall at once; the policy hops
    with pytest.raises(make_dataset.InputError, match="random:lots"):
        make_dataset.parse_mix(["random:lots"])


def test_newest_of_several_local_versions_is_resolved(tmp_path, monkeypatch):
    """Two local versions (v0, v2) of one name: an id without -vN means the newest; a given version is kept."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for v, seed in ((0, 0), (2, 1)):
            build(f"mujoco/hopper/versions-v{v}", "hopper-medium.npz", 30, seed)
    assert damo.resolve_minari_id("mujoco/hopper/versions", download=False) == "mujoco/hopper/versions-v2"
    assert damo.resolve_minari_id("mujoco/hopper/versions-v0", download=False) == "mujoco/hopper/versions-v0"
    data, info, _ = damo.load_dataset("mujoco/hopper/versions", download=False)
    assert info["dataset_ids"] == ["mujoco/hopper/versions-v2"] and len(data["rewards"]) == 30


def test_newest_local_version_is_resolved(minari_root):
    assert damo.resolve_minari_id("mujoco/hopper/medium", download=False) == "mujoco/hopper/medium-v0"
    assert damo.resolve_minari_id("mujoco/hopper/medium-v3", download=False) == "mujoco/hopper/medium-v3"
    with pytest.raises(damo.DamoError, match="not found"):
        damo.resolve_minari_id("mujoco/hopper/simple", download=False)


# --------------------------------------------------------------------------------------------------
# dynamics ensemble
# --------------------------------------------------------------------------------------------------


def test_ensemble_linear_equals_per_member():
    torch.manual_seed(0)
    layer = damo.EnsembleLinear(4, 6, 5)
    x = torch.randn(4, 9, 6)
    out = layer(x)
    for e in range(4):
        ref = torch.nn.functional.linear(x[e], layer.weight[e].T, layer.bias[e, 0])
        assert torch.allclose(out[e], ref, atol=1e-6)
    members = torch.tensor([3, 1])
    assert torch.allclose(layer(x[[3, 1]], members), out[[3, 1]], atol=1e-6)


def test_logvar_stays_within_bounds():
    torch.manual_seed(0)
    model = damo.DynamicsEnsemble(11, 3, 7, 32, 5)
    x = torch.randn(7, 64, 14) * 1e3  # extreme inputs push the raw log-variance far out
    _, logvar = model(x)
    # the soft clamp (MOPO's) can overshoot the upper bound by log(1 + exp(-(max - min))) ~ 3e-5 at most
    assert (logvar <= model.max_logvar + 1e-4).all() and (logvar >= model.min_logvar).all()
    assert logvar.max() > 0.49 and logvar.min() < -9.9  # the inputs did reach both bounds


@pytest.mark.slow
def test_dynamics_learns_real_hopper_transitions(minari_root):
    data, info, _ = damo.load_dataset("mujoco/hopper/medium-v0", download=False)
    torch.manual_seed(0)
    mean, std = data["observations"].mean(0), data["observations"].std(0) + 1e-3
    s = torch.as_tensor((data["observations"] - mean) / std)
    s2 = torch.as_tensor((data["next_observations"] - mean) / std)
    X = torch.cat([s, torch.as_tensor(data["actions"])], -1)
    Y = torch.cat([s2 - s, torch.as_tensor(data["rewards"])[:, None]], -1)
    # train on the first 7000 transitions (episodes in order), test on the last 1000: unseen episodes
    args = damo.Args(dynamics_max_epochs=30)  # the reward head needs ~30 epochs here (15 left it at 0.6 x var)
    model = damo.DynamicsEnsemble(11, 3, 7, 200, 5)
    out = damo.train_dynamics(model, X[:7000], Y[:7000], args, torch.Generator().manual_seed(0))
    # elites are the members with the lowest holdout error
    assert sorted(out["elites"]) == sorted(np.argsort(out["holdout_mse"])[:5].tolist())
    assert model.elites.tolist() == out["elites"]
    with torch.no_grad():
        pred, _ = model(X[7000:].expand(7, -1, -1))
    err = ((pred[model.elites].mean(0)[:, :-1] - Y[7000:, :-1]) ** 2).mean()
    no_change = (Y[7000:, :-1] ** 2).mean()  # predicting s' = s
    assert err < 0.2 * no_change, (float(err), float(no_change))
    reward_err = ((pred[model.elites].mean(0)[:, -1] - Y[7000:, -1]) ** 2).mean()
    assert reward_err < 0.2 * Y[7000:, -1].var()


@pytest.mark.parametrize("env_id,fn", [("Hopper-v5", damo.hopper_termination),
                                        ("Walker2d-v5", damo.walker2d_termination),
                                        ("HalfCheetah-v5", damo.never_terminates)])
def test_termination_fn_matches_real_env(env_id, fn):
    """Random and biased actions make the robot fall within a few dozen steps: many true terminations."""
    env = gym.make(env_id)
    rng = np.random.default_rng(0)
    next_obs, terms = [], []
    for ep in range(40):
        obs, _ = env.reset(seed=ep)
        bias = rng.uniform(-1, 1, env.action_space.shape) * (ep % 2)
        for t in range(300):
            obs, _, term, trunc, _ = env.step(np.clip(rng.uniform(-1, 1, env.action_space.shape) + bias, -1, 1))
            next_obs.append(obs), terms.append(term)
            if term or trunc:
                break
    pred = fn(torch.as_tensor(np.array(next_obs), dtype=torch.float64)).numpy()
    terms = np.array(terms)
    assert (pred == terms).all(), f"{(pred != terms).sum()} disagreements"
    if env_id != "HalfCheetah-v5":
        assert terms.sum() >= 20  # falls were covered


# --------------------------------------------------------------------------------------------------
# discriminator and the losses
# --------------------------------------------------------------------------------------------------


def test_discriminator_separates_shifted_synthetic_data(minari_root):
    data, _, _ = damo.load_dataset("mujoco/hopper/medium-v0", download=False)
    torch.manual_seed(0)
    mean, std = data["observations"].mean(0), data["observations"].std(0) + 1e-3
    s = torch.as_tensor((data["observations"] - mean) / std)
    a = torch.as_tensor(data["actions"])
    s2 = torch.as_tensor((data["next_observations"] - mean) / std)
    # "synthetic" = the same states with a model error: s' shifted by half a std in a few dimensions
    shift = torch.zeros(11)
    shift[[0, 5, 7]] = 0.5
    disc = damo.Discriminator(11, 3, 64)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    n = len(s) - 1000
    for _ in range(600):
        i, j = torch.randint(n, (128,)), torch.randint(n, (128,))
        loss, _ = damo.discriminator_loss(disc, (s[i], a[i], s2[i]), (s[j], a[j], s2[j] + shift))
        opt.zero_grad()
        loss.backward()
        opt.step()
    h = slice(n, None)  # held-out transitions
    _, info = damo.discriminator_loss(disc, (s[h], a[h], s2[h]), (s[h], a[h], s2[h] + shift))
    assert info["disc_acc"] > 0.85
    assert info["disc_p_offline"] > 0.7 > 0.3 > info["disc_p_synthetic"]
    # Eq. 4: the corrected reward is lower on shifted synthetic rows than on offline-like ones
    r = torch.ones(len(s[h]))
    syn = torch.ones(len(r))
    r_off, _ = damo.corrected_reward(disc, s[h], a[h], r, s2[h], syn, beta=0.1, clip=5.0)
    r_syn, b_syn = damo.corrected_reward(disc, s[h], a[h], r, s2[h] + shift, syn, beta=0.1, clip=5.0)
    assert r_syn.mean() < 1.0 < r_off.mean()
    assert b_syn.abs().max() <= 0.5 + 1e-6  # beta * c bounds the correction
    # offline rows keep their reward; beta = 0 removes the correction
    assert torch.equal(damo.corrected_reward(disc, s[h], a[h], r, s2[h] + shift, torch.zeros(len(r)), 0.1, 5.0)[0], r)
    assert torch.equal(damo.corrected_reward(disc, s[h], a[h], r, s2[h] + shift, syn, 0.0, 5.0)[0], r)


def _mlp_by_hand(seq, x):
    """damo.mlp's network from its weights, in float64: Linear, ReLU, ..., Linear."""
    lin = [m for m in seq if isinstance(m, torch.nn.Linear)]
    for m in lin[:-1]:
        x = np.maximum(x @ m.weight.detach().double().numpy().T + m.bias.detach().double().numpy(), 0.0)
    return x @ lin[-1].weight.detach().double().numpy().T + lin[-1].bias.detach().double().numpy()


def test_dynamics_loss_matches_hand_computation():
    """Eq. 9, member by member in float64: the Gaussian NLL mean((mu - y)^2 exp(-logvar) + logvar) of each
    member, summed over members, + 1/2 sum_l wd_l ||W_l||^2 (weights, not biases) + 0.01 (sum max_logvar -
    sum min_logvar), with log-variance soft-clamped between the learnable bounds (set close here, so the
    clamp acts)."""
    torch.manual_seed(0)
    E, obs_dim, act_dim, B = 3, 4, 2, 6
    model = damo.DynamicsEnsemble(obs_dim, act_dim, E, 8, 2)
    with torch.no_grad():
        model.max_logvar.copy_(torch.randn(1, 1, obs_dim + 1) * 0.3)
        model.min_logvar.copy_(model.max_logvar - 1.0 - torch.rand(1, 1, obs_dim + 1))
    x, y = torch.randn(E, B, obs_dim + act_dim), torch.randn(E, B, obs_dim + 1)
    loss, info = damo.dynamics_loss(model, x, y)

    W = [l.weight.detach().double().numpy() for l in [*model.layers, model.head]]
    hi, lo = model.max_logvar.detach().double().numpy()[0, 0], model.min_logvar.detach().double().numpy()[0, 0]
    nll = 0.0
    for e in range(E):  # member e on its own batch x[e]
        mu, logvar = (v[e] for v in _members_by_hand(model, x[e]))
        nll += np.mean((mu - y[e].double().numpy()) ** 2 * np.exp(-logvar) + logvar)
    decay = sum(wd * 0.5 * (w ** 2).sum() for wd, w in zip([2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4], W))
    expected = nll + decay + 0.01 * (hi.sum() - lo.sum())
    assert info["dynamics_nll"].item() == pytest.approx(nll, rel=1e-5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def _members_by_hand(model, x):
    """Every member of a DynamicsEnsemble from its weights, in float64: (mean, soft-clamped logvar) [E, B, out]."""
    W = [(l.weight.detach().double().numpy(), l.bias.detach().double().numpy()) for l in [*model.layers, model.head]]
    hi, lo = model.max_logvar.detach().double().numpy()[0, 0], model.min_logvar.detach().double().numpy()[0, 0]
    softplus = lambda z: np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0)  # noqa: E731
    means, logvars = [], []
    for e in range(model.n):
        h = x.double().numpy()
        for w, b in W[:-1]:
            z = h @ w[e] + b[e]
            h = z / (1 + np.exp(-z))
        out = h @ W[-1][0][e] + W[-1][1][e]
        k = out.shape[-1] // 2
        lv = lo + softplus((hi - softplus(hi - out[:, k:])) - lo)
        means.append(out[:, :k]), logvars.append(lv)
    return np.stack(means), np.stack(logvars)


def test_mopo_penalty_matches_hand_computation():
    """MOPO's u(s, a): over all 7 members, the largest L2 norm of the predicted std of (s', r), the
    observation part in raw units (normalised std x obs_std)."""
    torch.manual_seed(0)
    model = damo.DynamicsEnsemble(4, 2, 7, 16, 5)
    s, a = torch.randn(6, 4), torch.rand(6, 2) * 2 - 1
    obs_std = torch.tensor([0.5, 2.0, 1.0, 3.0])
    u = damo.mopo_penalty(model, s, a, obs_std)
    _, logvar = _members_by_hand(model, torch.cat([s, a], -1))
    scale = np.r_[obs_std.numpy(), 1.0]
    by_hand = np.max(np.linalg.norm(np.exp(0.5 * logvar) * scale, axis=-1), axis=0)
    np.testing.assert_allclose(u.detach().numpy(), by_hand, rtol=1e-5)
    assert not np.allclose(by_hand, np.max(np.linalg.norm(np.exp(0.5 * logvar), axis=-1), axis=0))  # units matter


def test_mobile_penalty_matches_hand_computation():
    """MOBILE's u(s, a): each elite draws n next states s' = s + mean + eps * std (the same eps here), a' ~ pi(s'),
    min over target critics of Q(s', a'), the mean over each elite's draws, then the std (n - 1) across elites."""
    torch.manual_seed(0)
    model = damo.DynamicsEnsemble(4, 2, 7, 16, 3)
    model.elites.copy_(torch.tensor([1, 4, 6]))
    critic, actor = damo.CriticEnsemble(4, 2, 16, 2), damo.Actor(4, 2, 16)
    s, a = torch.randn(5, 4), torch.rand(5, 2) * 2 - 1

    def q_j(j, x, y):  # critic j from its weights
        h = np.maximum(np.c_[x, y] @ critic.l1.weight[j].detach().numpy() + critic.l1.bias[j].detach().numpy(), 0)
        h = np.maximum(h @ critic.l2.weight[j].detach().numpy() + critic.l2.bias[j].detach().numpy(), 0)
        return (h @ critic.l3.weight[j].detach().numpy() + critic.l3.bias[j].detach().numpy())[:, 0]

    mean, logvar = _members_by_hand(model, torch.cat([s, a], -1))
    mean, logvar = mean[[1, 4, 6]], logvar[[1, 4, 6]]
    for chunk in (1024, 7):  # 60 next states: one pass, then 9 chunks (the CPU path of 12,150 rows)
        torch.manual_seed(1)
        u = damo.mobile_penalty(model, critic, actor, s, a, 4, chunk)
        torch.manual_seed(1)  # the same draws, in the same order: eps, then the actor's noise, chunk by chunk
        eps = torch.randn(4, 3, 5, 5).double().numpy()
        s2 = s.double().numpy() + (mean + eps * np.exp(0.5 * logvar))[..., :-1]  # [4, 3, 5, 4]
        flat = torch.as_tensor(s2.reshape(-1, 4)).float()
        a2 = torch.cat([actor.sample(x)[0] for x in flat.split(chunk)])
        q = np.minimum(q_j(0, flat.numpy(), a2.detach().numpy()),
                       q_j(1, flat.numpy(), a2.detach().numpy())).reshape(4, 3, 5)
        np.testing.assert_allclose(u.detach().numpy(), q.mean(0).std(0, ddof=1), rtol=1e-4, atol=1e-6)


def test_critic_target_with_a_peer_penalty_and_clamp():
    """critic_loss with a penalty: y = r - penalty(s, a) on synthetic rows only (offline rows keep r; the
    penalty is not even computed there: MOBILE's costs 10 x elites critic calls per row), then
    MOBILE's clamp at 0; here with the deterministic backup (no entropy term), as MOBILE."""
    torch.manual_seed(0)
    critic, actor = damo.CriticEnsemble(4, 2, 16, 2), damo.Actor(4, 2, 16)
    batch, n_real, gamma = _small_batch(), 3, 0.9
    pen, seen = torch.linspace(0.5, 4.0, 8), []
    torch.manual_seed(2)
    _, info = damo.critic_loss(critic, critic, actor, torch.tensor(0.0), batch, n_real, None, 0.0, gamma, False,
                               lambda s, a: seen.append(s) or pen[n_real:], 0.0)
    assert len(seen) == 1 and torch.equal(seen[0], batch["obs"][n_real:])  # computed on the synthetic rows only
    torch.manual_seed(2)
    a2, _ = actor.sample(batch["next_obs"])
    with torch.no_grad():
        y = batch["rew"] - pen * (torch.arange(8) >= n_real) + gamma * (1 - batch["done"]) * critic(batch["next_obs"], a2).min(0).values
    assert (y < 0).any() and (y > 0).any()  # the clamp acts on some rows
    assert info["target_q"].item() == pytest.approx(y.clamp_min(0).mean().item(), rel=1e-5)
    assert info["penalty_synthetic"].item() == pytest.approx(pen[n_real:].mean().item())  # logged


def test_outside_share_by_hand():
    """The threshold is the 95th percentile of the offline-to-offline nearest-neighbour distances; a point is
    outside when its nearest offline neighbour is farther than that."""
    import plot

    ref_a = np.arange(20.0)[:, None]            # every point 0.5 from ref_b: the threshold is 0.5
    ref_b = np.arange(20.0)[:, None] + 0.5
    share, threshold = plot.outside_share(ref_a, ref_b, np.array([[0.6], [10.0], [30.0], [-3.0]]))
    assert threshold == pytest.approx(0.5) and share == pytest.approx(0.5)  # 0.1 and 0.0 inside; 10.5 and 3.5 outside


def test_peer_settings_per_dataset():
    """--penalty mopo|mobile applies each dataset's published (h, coefficient) and the peers' shared SAC settings
    to every flag not given; a flag given wins; a dataset without published settings needs both values."""
    def resolved(penalty, dataset, explicit=frozenset(), **given):
        args = damo.with_env_defaults(damo.Args(penalty=penalty, **given), dataset.split("-")[0], dataset)
        return damo.with_peer_settings(args, dataset, {"penalty", *explicit})

    a = resolved("mopo", "hopper-medium-expert")
    assert (a.rollout_length, a.penalty_coef, a.alpha, a.beta, a.real_ratio, a.gamma, a.tau, a.alpha_ent_lr,
            a.backup_entropy, a.alpha_ent_fixed, a.actor_lr_schedule) == (5, 5.0, 0.0, 0.0, 0.05, 0.99, 0.005, 1e-4,
                                                                          True, None, "cosine")
    assert (resolved("mopo", "walker2d-medium-replay").rollout_length, resolved("mopo", "walker2d-medium-replay").penalty_coef) == (1, 2.5)
    m = resolved("mobile", "hopper-medium")
    assert (m.penalty_coef, m.alpha_ent_fixed, m.backup_entropy, m.rollout_length) == (1.5, 0.2, False, 5)
    assert resolved("mobile", "halfcheetah-medium-expert").real_ratio == 0.5
    assert resolved("mobile", "walker2d-medium-expert").rollout_length == 1
    assert resolved("mobile", "hopper-medium-expert").alpha_ent_fixed is None
    assert resolved("mopo", "hopper-medium", {"penalty_coef"}, penalty_coef=3.0).penalty_coef == 3.0  # given wins
    assert resolved("none", "hopper-medium").alpha == 5.0  # DAMO untouched
    assert resolved("none", "hopper-medium").actor_lr_schedule == "constant"
    assert resolved("mobile", "hopper-medium", {"actor_lr_schedule"}).actor_lr_schedule == "constant"  # given wins
    with pytest.raises(damo.DamoError, match="no published setting for dataset 'hopper-expert'"):
        resolved("mopo", "hopper-expert")
    ok = resolved("mopo", "hopper-expert", {"penalty_coef", "rollout_length"}, penalty_coef=1.0, rollout_length=3)
    assert (ok.penalty_coef, ok.rollout_length, ok.alpha) == (1.0, 3, 0.0)
    import sweep

    runs, _, _ = sweep.plan(sweep.SweepArgs(env_ids=["hopper-medium-expert"], seeds=[0], variants=["mopo", "mobile"],
                                            sweep_dir="unused"), ["--epochs", "2"])
    assert [r["argv"][2:4] for r in runs] == [["--penalty", "mopo"], ["--penalty", "mobile"]]


def test_cosine_actor_lr_follows_torch_per_epoch_schedule():
    """--actor-lr-schedule cosine sets, at each epoch's first step, the rate torch's CosineAnnealingLR(T_max=E)
    gives when stepped once per epoch (the peers' code), holds it within the epoch, and ends near 0;
    constant leaves the rate alone."""
    args = damo.Args(bc=True, epochs=6, steps_per_epoch=10, actor_lr=3e-4, actor_lr_schedule="cosine")
    ag, ref = damo.make_agent(3, 2, args, "cpu"), damo.make_agent(3, 2, args, "cpu")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref.actor_opt, T_max=args.epochs)
    seen = []
    for step in range(1, args.epochs * args.steps_per_epoch + 1):
        damo.set_actor_lr(ag, args, step)
        seen.append(ag.actor_opt.param_groups[0]["lr"])
        if step % args.steps_per_epoch == 0:
            assert len(set(seen[-args.steps_per_epoch:])) == 1  # one rate per epoch
            assert seen[-1] == pytest.approx(ref.actor_opt.param_groups[0]["lr"], rel=1e-9)
            sched.step()
    assert seen[0] == 3e-4 and seen[-1] == pytest.approx(3e-4 * (1 + math.cos(math.pi * 5 / 6)) / 2) and seen[-1] < 0.07 * 3e-4
    flat = damo.make_agent(3, 2, replace(args, actor_lr_schedule="constant"), "cpu")
    damo.set_actor_lr(flat, replace(args, actor_lr_schedule="constant"), 31)
    assert flat.actor_opt.param_groups[0]["lr"] == 3e-4


def test_discriminator_loss_matches_hand_computation():
    """Eq. 3 in float64: -mean log D(offline) - mean log(1 - D(synthetic)), D = sigmoid of the classifier's
    logit on (s, a, s' - s); accuracy and mean probabilities from the same logits."""
    torch.manual_seed(0)
    disc = damo.Discriminator(4, 2, 16)
    off, syn = _small_batch(1), _small_batch(2)
    loss, info = damo.discriminator_loss(disc, (off["obs"], off["act"], off["next_obs"]),
                                         (syn["obs"], syn["act"], syn["next_obs"]))

    def logits(b):
        s, a, s2 = (b[k].double().numpy() for k in ("obs", "act", "next_obs"))
        return _mlp_by_hand(disc.net, np.concatenate([s, a, s2 - s], -1))[:, 0]

    l_off, l_syn = logits(off), logits(syn)
    p_off, p_syn = 1 / (1 + np.exp(-l_off)), 1 / (1 + np.exp(-l_syn))
    assert 0 < (p_off > 0.5).mean() < 1 or 0 < (p_syn < 0.5).mean() < 1  # both signs present: accuracy is tested
    assert loss.item() == pytest.approx(-np.log(p_off).mean() - np.log(1 - p_syn).mean(), rel=1e-5)
    assert info["disc_acc"].item() == pytest.approx(0.5 * ((l_off > 0).mean() + (l_syn < 0).mean()))
    assert info["disc_p_offline"].item() == pytest.approx(p_off.mean(), rel=1e-5)
    assert info["disc_p_synthetic"].item() == pytest.approx(p_syn.mean(), rel=1e-5)
    # Eq. 4 from the same logits: r~ = r + beta * clip(logit, -c, c) on synthetic rows, r on offline rows
    is_syn = torch.tensor([1.0, 0.0] * 4)
    r_new, bonus = damo.corrected_reward(disc, syn["obs"], syn["act"], syn["rew"], syn["next_obs"], is_syn, 0.3, 0.05)
    expected = syn["rew"].double().numpy() + 0.3 * np.clip(l_syn, -0.05, 0.05) * is_syn.numpy()
    assert np.abs(l_syn).max() > 0.05  # the clip acts on some rows
    np.testing.assert_allclose(r_new.double().numpy(), expected, rtol=1e-5, atol=1e-7)


def test_temperature_loss_matches_hand_computation():
    """Eq. 8: L = -log alpha_ent * mean(log pi + target_entropy); its gradient -mean(log pi + target) lowers
    alpha_ent while the entropy is above its target and raises it below."""
    logp = torch.tensor([-1.5, 0.3, 2.0, -0.4])
    for log_alpha, target in ((-0.7, -2.0), (0.4, -3.0)):
        la = torch.tensor(log_alpha, requires_grad=True)
        loss, info = damo.temperature_loss(la, logp, target)
        loss.backward()
        m = float(logp.mean()) + target
        assert loss.item() == pytest.approx(-log_alpha * m, rel=1e-6)
        assert la.grad.item() == pytest.approx(-m, rel=1e-6)
        assert info["alpha_ent"].item() == pytest.approx(math.exp(log_alpha), rel=1e-6)


def test_bc_loss_matches_hand_computation():
    """The BC baseline: mean over rows of ||tanh(mu(s)) - a||^2, mu the actor's mean from its weights."""
    torch.manual_seed(0)
    actor = damo.Actor(4, 2, 16)
    b = _small_batch(3)
    loss, info = damo.bc_loss(actor, b["obs"], b["act"])
    mu = _mlp_by_hand(actor.trunk, b["obs"].double().numpy())[:, :2]
    expected = ((np.tanh(mu) - b["act"].double().numpy()) ** 2).sum(-1).mean()
    assert loss.item() == pytest.approx(expected, rel=1e-5) and info["bc_loss"].item() == loss.item()


def _small_batch(seed=0, B=8, obs_dim=4, act_dim=2):
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randn(B, obs_dim, generator=g), "act": torch.rand(B, act_dim, generator=g) * 2 - 1,
            "rew": torch.randn(B, generator=g), "next_obs": torch.randn(B, obs_dim, generator=g),
            "done": (torch.rand(B, generator=g) < 0.3).float()}


@pytest.mark.parametrize("alpha,backup_entropy", [(0.0, True), (2.5, True), (2.5, False)])
def test_critic_loss_matches_hand_computation(alpha, backup_entropy):
    torch.manual_seed(0)
    critic, actor = damo.CriticEnsemble(4, 2, 16, 2), damo.Actor(4, 2, 16)
    target = copy.deepcopy(critic)
    for p in target.parameters():
        p.data.add_(0.1)
    log_alpha_ent = torch.tensor(-1.0)
    batch, n_real, gamma = _small_batch(), 3, 0.9
    batch["done"][[1, 5]] = 1.0  # two terminal next states: no bootstrap

    def q_j(j, s, a):  # the j-th critic by hand, from its weights
        h = torch.relu(torch.cat([s, a], -1) @ critic.l1.weight[j] + critic.l1.bias[j])
        h = torch.relu(h @ critic.l2.weight[j] + critic.l2.bias[j])
        return (h @ critic.l3.weight[j] + critic.l3.bias[j]).squeeze(-1)

    torch.manual_seed(1)
    loss, info = damo.critic_loss(critic, target, actor, log_alpha_ent, batch, n_real, None, alpha, gamma,
                                  backup_entropy)
    torch.manual_seed(1)  # same samples: a' ~ pi(s') first, then a ~ pi(s)
    a2, logp2 = actor.sample(batch["next_obs"])
    a_pi = actor.sample(batch["obs"])[0]
    with torch.no_grad():
        v2 = torch.minimum(*target(batch["next_obs"], a2)) - (math.exp(-1.0) * logp2 if backup_entropy else 0.0)
        y = batch["rew"] + gamma * (1 - batch["done"]) * v2
    s, a = batch["obs"], batch["act"]
    expected, q_off, q_syn = 0.0, 0.0, 0.0
    for j in range(2):
        q = q_j(j, s, a)
        expected = expected + 0.5 * ((y - q) ** 2).mean()
        down = q_j(j, s, a_pi.detach()).mean()
        expected = expected + alpha * (down - q[:n_real].mean())
        q_off, q_syn = q_off + q[:n_real].mean() / 2, q_syn + q[n_real:].mean() / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    # the diagnostics read Q on B's offline rows (the data's actions) and on its synthetic rows, apart
    assert info["q_data"].item() == pytest.approx(q_off.item(), rel=1e-5)
    assert info["q_synthetic"].item() == pytest.approx(q_syn.item(), rel=1e-5)
    if alpha == 0:
        assert info["conservative_gap"].item() == 0.0


def test_critic_loss_with_separate_offline_batch():
    torch.manual_seed(0)
    critic, actor = damo.CriticEnsemble(4, 2, 16, 2), damo.Actor(4, 2, 16)
    batch, offline = _small_batch(0), _small_batch(5)
    torch.manual_seed(1)
    loss, info = damo.critic_loss(critic, critic, actor, torch.tensor(0.0), batch, 1, offline, 1.0, 0.9)
    torch.manual_seed(1)
    actor.sample(batch["next_obs"])
    a_pi = actor.sample(batch["obs"])[0]
    gap = (critic(batch["obs"], a_pi).mean(1) - critic(offline["obs"], offline["act"]).mean(1)).mean()
    assert info["conservative_gap"].item() == pytest.approx(gap.item(), rel=1e-5)


@pytest.mark.parametrize("alpha,bc_coef,bc_filter", [(0.0, 0.2, True), (5.0, 0.0, True), (5.0, 0.2, False),
                                                     (5.0, 0.2, True)])
def test_actor_loss_matches_hand_computation(alpha, bc_coef, bc_filter):
    torch.manual_seed(0)
    critic, actor = damo.CriticEnsemble(4, 2, 16, 2), damo.Actor(4, 2, 16)
    log_alpha_ent = torch.tensor(-0.5)
    b = _small_batch()
    s_d, a_d = b["obs"][:6], b["act"][:6]
    torch.manual_seed(3)
    loss, info, logp = damo.actor_loss(critic, actor, log_alpha_ent, b["obs"], s_d, a_d, alpha, bc_coef, bc_filter)
    torch.manual_seed(3)
    a, logp_ref = actor.sample(b["obs"])
    q = critic(b["obs"], a).min(0).values
    sac = (math.exp(-0.5) * logp_ref - q).mean()
    if alpha * bc_coef > 0:
        mu = torch.tanh(actor(s_d)[0])
        err = ((mu - a_d) ** 2).sum(-1)
        # Eq. 7b with the filter: only rows whose data action the critic ranks above mu(s)
        better = [critic(s_d[i:i + 1], a_d[i:i + 1]).min().item() > critic(s_d[i:i + 1], mu[i:i + 1]).min().item()
                  for i in range(6)]
        if bc_filter:
            assert 0 < sum(better) < 6, better  # the check below tells the filter from no filter
        keep = torch.tensor(better, dtype=torch.float32) if bc_filter else torch.ones(6)
        bc = (keep * err).sum() / keep.sum()  # self-normalised: the mean over the kept rows
        assert info["actor_bc_kept"].item() == pytest.approx(keep.mean().item())
        expected = sac / q.abs().mean() + alpha * bc_coef * bc
    else:
        expected = sac  # exactly Eq. 7: alpha = 0 ("w/o ir") removes the behaviour term too
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(logp, logp_ref)


def test_tanh_gaussian_log_prob_is_a_density():
    """log pi(a|s) of Actor.sample integrates to 1 over the action box (1-D action, numerical check)."""
    torch.manual_seed(0)
    actor = damo.Actor(3, 1, 8)
    s = torch.randn(1, 3)
    mu, log_std = actor(s)
    a = torch.linspace(-0.9999, 0.9999, 200001)[:, None]
    u = torch.atanh(a)
    normal = torch.distributions.Normal(mu[0], log_std[0].exp())
    dens = (normal.log_prob(u) - torch.log(1 - a ** 2)).exp().squeeze()
    assert torch.trapezoid(dens, a.squeeze()).item() == pytest.approx(1.0, abs=2e-2)
    # and sample() agrees with that density at its own samples
    torch.manual_seed(1)
    a_s, logp = actor.sample(s.expand(5, -1))
    ref = normal.log_prob(torch.atanh(a_s)) - torch.log(1 - a_s ** 2)
    assert torch.allclose(logp, ref.squeeze(-1), atol=1e-3)


def test_model_rollout_uses_elites_and_stops_terminated_branches():
    """Every member is made constant: s' = s, reward 100 * (member index), tiny noise. The rewards then
    show which members ran (all five elites, never another member), and with normalisation statistics
    that are not the identity, termination is only right on de-normalised observations."""
    torch.manual_seed(0)
    model = damo.DynamicsEnsemble(11, 3, 7, 16, 5)
    model.elites.copy_(torch.tensor([0, 2, 3, 5, 6]))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[..., 11] = 100.0 * torch.arange(7.0)[:, None]  # the reward mean of member k
        model.head.bias[..., 12:] = -20.0  # log-variance at its lower bound: std ~ 0.007
    actor = damo.Actor(11, 3, 16)
    mean, std = torch.zeros(11), torch.ones(11)
    mean[0], std[0] = 1.0, 0.5  # raw height = 1 + 0.5 * normalised height
    start = torch.zeros(1000, 11)
    start[:500, 0] = 0.4  # raw 1.2: healthy, these branches run all 3 steps
    start[500:, 0] = -1.0  # raw 0.5: fallen, these stop after their first step
    out = damo.model_rollout(model, actor, start, 3, damo.hopper_termination, mean, std)  # rows: step 1, 2, 3
    chunked = damo.model_rollout(model, actor, start, 3, damo.hopper_termination, mean, std, chunk=300)
    assert chunked["rew"].shape[0] == out["rew"].shape[0] and chunked["done"].sum() == out["done"].sum() == 500
    n = out["rew"].shape[0]
    assert all(v.shape[0] == n for v in out.values())
    assert n == 1000 + 2 * 500  # step 1 for all, steps 2-3 for the healthy half only
    members = torch.round(out["rew"] / 100).long()
    assert set(members.tolist()) == {0, 2, 3, 5, 6}  # each elite, and no other member
    assert torch.equal(out["done"][:1000].bool(), torch.arange(1000) >= 500)
    assert not out["done"][1000:].bool().any()
    # a terminated branch never appears again: rows after step 1 all start from non-terminal states
    assert not damo.hopper_termination(out["obs"][1000:] * std + mean).any()


# --------------------------------------------------------------------------------------------------
# the CLI, end to end, and bad input
# --------------------------------------------------------------------------------------------------


def test_cli_end_to_end_files_and_numbers(e2e_run):
    run = e2e_run
    rows = list(csv.DictReader(open(run / "eval.csv")))
    assert [int(r["global_step"]) for r in rows] == [100, 200] and [int(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:
        assert all(math.isfinite(float(r[k])) for k in ("return_mean", "return_std", "normalized_score"))
        assert float(r["return_mean"]) > -100
    res = json.load(open(run / "results.json"))
    assert res["global_steps"] == 200 and res["eval_episodes"] == 2 and res["seed"] == 3
    assert res["dataset_ids"] == ["mujoco/hopper/medium-v0", "mujoco/hopper/expert-v0"]
    assert res["final_normalized_score"] == pytest.approx(float(rows[-1]["normalized_score"]), abs=1e-3)
    assert res["last10_normalized_score"] == pytest.approx(np.mean([float(r["normalized_score"]) for r in rows]), abs=1e-3)
    assert len(res["final_returns"]) == 2 and res["gradient_steps_per_s"] > 0
    assert res["dynamics"]["dynamics_epochs"] == 2 and len(res["dynamics"]["elites"]) == 5
    assert set(res["wall_time_s"]) >= {"data_s", "dynamics_s", "rollout_s", "update_s", "eval_s", "total_s"}
    assert torch.__version__.startswith(res["versions"]["torch"].split("+")[0])
    cfg = json.load(open(run / "config.json"))
    assert cfg["args"]["seed"] == 3 and cfg["args"]["steps_per_epoch"] == 100 and cfg["args"]["eval_episodes"] == 2
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ck["global_step"] == 200
    assert ck["obs_mean"].shape == (11,) and torch.isfinite(ck["obs_std"]).all() and (ck["obs_std"] > 0).all()
    for k in ("actor", "dynamics", "discriminator", "critic", "critic_target"):
        assert all(torch.isfinite(v).all() for v in ck[k].values()), k
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run))


def test_resume_of_a_run_killed_in_its_heldout_evaluation(minari_root, e2e_run, tmp_path):
    """Killed after its last checkpoint but before results.json (during the held-out evaluation): --resume
    trains nothing, plays the held-out block and writes results.json; the same scores as the finished run."""
    run = copy_run(e2e_run, tmp_path / "killed")
    done = json.load(open(run / "results.json"))
    (run / "results.json").unlink()
    p = run_cli(["--resume", str(run)], minari_root)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.load(open(run / "results.json"))
    assert res["heldout"]["returns"] == done["heldout"]["returns"] and res["global_steps"] == 200
    assert res["final_normalized_score"] == done["final_normalized_score"] and res["resumed_at_steps"] == [200]
    assert [r["global_step"] for r in csv.DictReader(open(run / "eval.csv"))] == ["100", "200"]  # nothing redone
    again = run_cli(["--resume", str(run)], minari_root)  # now finished
    assert again.returncode == 2 and "already finished at step 200" in again.stderr


def test_peer_runs_record_their_settings_and_bad_values_are_refused(minari_root, e2e_run, tmp_path):
    """A tiny MOPO and MOBILE run on the e2e run's ensemble: finite evaluations, config.json holds the dataset's
    published settings (TINY's explicit --rollout-length 3 kept). An unknown
    penalty, a penalty with --bc, a coefficient without a penalty: exit 2, one line naming the flag, no run."""
    for penalty, coef, backup in (("mopo", 5.0, True), ("mobile", 1.5, False)):
        p = run_cli(["--env-id", "hopper-medium-expert", "--seed", "3", "--runs-dir", str(tmp_path), "--run-name", penalty,
                     "--no-download", "--penalty", penalty, "--dynamics-path", str(e2e_run / "dynamics.pt"), *TINY],
                    minari_root)
        assert p.returncode == 0, p.stderr[-3000:]
        cfg = json.load(open(tmp_path / penalty / "config.json"))["args"]
        assert (cfg["penalty"], cfg["penalty_coef"], cfg["backup_entropy"], cfg["alpha"], cfg["beta"], cfg["real_ratio"],
                cfg["rollout_length"]) == (penalty, coef, backup, 0.0, 0.0, 0.05, 3)
        res = json.load(open(tmp_path / penalty / "results.json"))
        assert res["variant"] == f"{penalty}(coef={coef})"  # named as the peer, not as a DAMO with its alignments off
        rows = list(csv.DictReader(open(tmp_path / penalty / "eval.csv")))
        assert len(rows) == 2 and all(math.isfinite(float(r["return_mean"])) for r in rows)
        # the peers' cosine schedule ran: the second (last) of 2 epochs trained at half the actor's rate
        opt = torch.load(tmp_path / penalty / "checkpoint.pt", weights_only=False)["optimizers"]["actor"]
        assert cfg["actor_lr_schedule"] == "cosine" and opt["param_groups"][0]["lr"] == pytest.approx(cfg["actor_lr"] / 2)
    # plot.py side-by-side: the three methods (the e2e run is DAMO, seed 3) in one embedding, a panel each;
    # DAMO has a second seed (the same networks evaluated from seed 4's start states): its numbers are the mean
    copy_run(e2e_run, tmp_path / "damo")
    second = copy_run(e2e_run, tmp_path / "damo4")
    cfg = json.loads((second / "config.json").read_text())
    cfg["args"]["seed"] = 4
    (second / "config.json").write_text(json.dumps(cfg))
    ck = torch.load(second / "checkpoint.pt", weights_only=False)
    ck["args"]["seed"] = 4
    torch.save(ck, second / "checkpoint.pt")
    q = run_plot(["side-by-side", str(tmp_path), "--env-id", "hopper-medium-expert", "--seeds", "3", "4", "--episodes",
                  "2", "--out", str(tmp_path / "fig1")], minari_root)
    assert q.returncode == 0, q.stderr[-3000:]
    res = json.load(open(tmp_path / "fig1.json"))
    assert [(t["variant"], t["seeds"]) for t in res["methods"]] == [
        ("DAMO (rollout_length=3)", [3, 4]), ("MOBILE (rollout_length=3)", [3]), ("MOPO (rollout_length=3)", [3])]
    for t in res["methods"]:
        assert 0 <= t["real_outside"] <= 1 and 0 <= t["synthetic_outside"] <= 1 and t["n_real"] > 0
        mine = [r for r in res["runs"] if r["variant"] == t["variant"]]
        assert t["real_outside"] == pytest.approx(np.mean([r["real_outside"] for r in mine]))
        assert t["n_real"] == sum(r["n_real"] for r in mine)
        shown = f"{100 * t['real_outside']:.1f}%" + (f" +- {100 * t['real_outside_std']:.1f}" if len(mine) > 1 else "")
        assert f"| {t['variant']} | {', '.join(map(str, t['seeds']))} | {shown} ({t['n_real']}) |" in q.stdout, q.stdout
    assert [r["seed"] for r in res["runs"]] == [3, 4, 3, 3]
    assert res["runs"][0]["real_return_mean"] != res["runs"][1]["real_return_mean"]  # seed 4's own start states
    assert len({t["threshold"] for t in res["runs"]}) == 1  # one reference for every run
    assert (tmp_path / "fig1.png").read_bytes()[:4] == b"\x89PNG"
    bad = [["--penalty", "mopa"], ["--penalty", "mopo", "--bc"], ["--penalty-coef", "2"], ["--actor-lr-schedule", "linear"]]
    says = ["--penalty mopa: unknown", "--bc has no critic", "--penalty-coef 2.0 weighs a peer's penalty",
            "--actor-lr-schedule linear: unknown"]
    for (code, err), must in zip(run_many("damo.py", [[*b, "--runs-dir", str(tmp_path / "no")] for b in bad], minari_root), says):
        error_line(code, err, must)
    assert not (tmp_path / "no").exists()


def test_heldout_block_is_disjoint_from_every_training_evaluation():
    """Training evaluations reset episode k with seed + 10000 + k; the held-out block of any run seed lies
    above every start seed any training evaluation of any seed can use (seeds < 2^32, up to a million
    evaluation episodes), and the blocks of two run seeds never meet (at most 1,000 held-out episodes)."""
    highest_training_seed = (2**32 - 1) + 10_000 + 10**6
    for seed in (0, 1, 2, 3, 12345, 2**31, 2**32 - 1):
        block = damo.heldout_seeds(seed, 1000)
        assert block.start > highest_training_seed and len(block) == 1000
        assert set(block).isdisjoint(damo.heldout_seeds(seed + 1, 1000))
        assert set(block).isdisjoint(range(seed + 10_000, seed + 10_000 + 10**6))
    # and the envs take such seeds: the same start state for the same seed, another one for the next
    env = gym.make("Hopper-v5")
    s0, s0b, s1 = (env.reset(seed=x)[0] for x in (damo.heldout_seeds(7, 2)[0], damo.heldout_seeds(7, 2)[0],
                                                  damo.heldout_seeds(7, 2)[1]))
    assert np.array_equal(s0, s0b) and not np.array_equal(s0, s1)


def test_heldout_score_in_results_equals_eval_only(minari_root, e2e_run, tmp_path):
    """A finished run records its final policy's held-out score (3 episodes in the tiny run, seed 3's block);
    `--eval-only RUN --heldout` replays exactly those episodes and, for a copy of a run without one, records
    it in that run's results.json; --heldout without --eval-only is refused."""
    res = json.load(open(e2e_run / "results.json"))
    h = res["heldout"]
    assert h["episodes"] == 3 and h["seeds"] == [2**34 + 3000, 2**34 + 3003] and len(h["returns"]) == 3
    assert res["heldout_normalized_score"] == h["normalized_score"]
    ag, ck = damo.load_agent(str(e2e_run))
    rets = damo.evaluate(ag.actor, [gym.make("Hopper-v5") for _ in range(3)], 2**34 + 3000, ck["obs_mean"],
                         ck["obs_std"], "cpu")
    assert rets.tolist() == h["returns"]
    run = copy_run(e2e_run, tmp_path / "old")
    old = {k: v for k, v in res.items() if not k.startswith("heldout")}  # a run made before held-out scores
    (run / "results.json").write_text(json.dumps(old))
    p = run_cli(["--eval-only", str(run), "--heldout", "--heldout-episodes", "3"], minari_root)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["returns"] == h["returns"] and out["seed"] == 3 and "recorded in" in p.stderr
    now = json.load(open(run / "results.json"))
    assert now["heldout"]["returns"] == h["returns"] and now["heldout_normalized_score"] == h["normalized_score"]
    assert {k: v for k, v in now.items() if not k.startswith("heldout")} == old
    q = run_cli(["--heldout", "--runs-dir", str(tmp_path / "r")], minari_root)
    assert q.returncode == 2 and "--heldout" in q.stderr and "--eval-only" in q.stderr and "Traceback" not in q.stderr


def test_checkpoint_reproduces_logged_evaluation(e2e_run):
    run = e2e_run
    rows = list(csv.DictReader(open(run / "eval.csv")))
    ag, ck = damo.load_agent(str(run))
    assert ck["global_step"] == 200 and ag.critic is not None and ag.dynamics is not None
    rets = damo.evaluate(ag.actor, [gym.make("Hopper-v5") for _ in range(2)], 3 + 10_000, ck["obs_mean"], ck["obs_std"], "cpu")
    assert rets.mean() == pytest.approx(float(rows[-1]["return_mean"]), rel=1e-3)


def test_dynamics_path_reuses_the_saved_ensemble(minari_root, e2e_run, tmp_path):
    """--dynamics-path: not retrained, and the run records its source."""
    run = e2e_run
    p = run_cli(["--env-id", "hopper-medium-expert", "--runs-dir", str(tmp_path), "--run-name", "reuse", "--no-download",
                 *TINY, "--epochs", "1", "--dynamics-path", str(run / "dynamics.pt")], minari_root)
    assert p.returncode == 0, p.stderr[-3000:]
    res2 = json.load(open(tmp_path / "reuse" / "results.json"))
    assert res2["dynamics"]["source"] == str(run / "dynamics.pt") and res2["wall_time_s"]["dynamics_s"] == 0
    ck2 = torch.load(tmp_path / "reuse" / "checkpoint.pt", weights_only=False)
    saved = torch.load(run / "dynamics.pt", weights_only=False)["dynamics"]
    assert all(torch.equal(ck2["dynamics"][k], v) for k, v in saved.items())


def test_cli_bc_and_ablation_flags(minari_root, tmp_path):
    p = run_cli(["--env-id", "mujoco/hopper/medium-v0", "--bc", "--runs-dir", str(tmp_path), "--run-name", "bc",
                 "--no-download", *TINY], minari_root)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.load(open(tmp_path / "bc" / "results.json"))
    assert res["variant"] == "bc" and res["dataset_ids"] == ["mujoco/hopper/medium-v0"]
    ck = torch.load(tmp_path / "bc" / "checkpoint.pt", weights_only=False)
    assert ck["critic"] is None and ck["dynamics"] is None and not (tmp_path / "bc" / "dynamics.pt").exists()
    rows = list(csv.DictReader(open(tmp_path / "bc" / "eval.csv")))
    assert len(rows) == 2 and all(math.isfinite(float(r["normalized_score"])) for r in rows)


def tb_values(run, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run))
    ea.Reload()
    return [e.value for e in ea.Scalars(tag)] if tag in ea.Tags()["scalars"] else []


def test_cli_ablation_flags_remove_their_terms(minari_root, e2e_run, tmp_path):
    """--alpha 0 ("w/o ir") leaves no conservative gap and no Eq. 7b error; --beta 0 ("w/o er") trains no
    classifier and corrects no reward; the default run has both (TensorBoard scalars of each run)."""
    common = ["--env-id", "hopper-medium-expert", "--no-download", "--runs-dir", str(tmp_path),
              "--dynamics-path", str(e2e_run / "dynamics.pt"), *flags(epochs=1, log_every=25)]
    results = run_many("damo.py", [[*common, "--run-name", "wo_ir", "--alpha", "0"],
                                   [*common, "--run-name", "wo_er", "--beta", "0"]], minari_root)
    assert [code for code, _ in results] == [0, 0], results
    assert json.load(open(tmp_path / "wo_ir" / "config.json"))["args"]["alpha"] == 0.0
    gap, bc = tb_values(tmp_path / "wo_ir", "diagnostics/conservative_gap"), tb_values(tmp_path / "wo_ir", "losses/actor_bc_mse")
    assert len(gap) == 4 and all(v == 0.0 for v in gap) and all(v == 0.0 for v in bc)
    assert tb_values(tmp_path / "wo_er", "losses/disc_loss") == []
    assert all(v == 0.0 for v in tb_values(tmp_path / "wo_er", "diagnostics/reward_bonus_synthetic"))
    # the default run (the shared tiny run) has both terms
    assert any(v != 0.0 for v in tb_values(e2e_run, "diagnostics/conservative_gap"))
    assert any(v != 0.0 for v in tb_values(e2e_run, "diagnostics/reward_bonus_synthetic"))
    assert len(tb_values(e2e_run, "losses/disc_loss")) > 0


def test_cli_env_defaults_apply_where_the_flag_is_not_given(tmp_path, monkeypatch):
    """On HalfCheetah data: alpha takes halfcheetah's value unless given on the command line, where a value
    equal to another env's default (--alpha 5, hopper's) is kept; the other weights are the same on every
    dataset (config.json of each run). walker2d-medium-expert (its short id, resolved to a Minari id)
    takes its own row, not walker2d's."""
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build("mujoco/halfcheetah/tiny-v0", "halfcheetah-sac-20k.npz", 1000, 0, env_id="HalfCheetah-v5")
        build("mujoco/walker2d/medium-expert-v0", "walker2d-sac-25k.npz", 300, 0, env_id="Walker2d-v5")
    tiny = ["--bc", "--no-download", "--runs-dir", str(tmp_path / "runs"), *flags(epochs=1, steps_per_epoch=10, eval_episodes=1)]
    common = ["--env-id", "mujoco/halfcheetah/tiny-v0", *tiny]
    results = run_many("damo.py", [[*common, "--run-name", "plain"], [*common, "--run-name", "given", "--alpha", "5",
                                                                     "--tau=0.02"],
                                   ["--env-id", "walker2d-medium-expert", *tiny, "--run-name", "w2d"]], root)
    assert [code for code, _ in results] == [0, 0, 0], results
    plain, given, w2d = (json.load(open(tmp_path / "runs" / n / "config.json"))["args"] for n in ("plain", "given", "w2d"))
    assert damo.ENV_DEFAULTS["halfcheetah"] == {"alpha": 0.5, "gamma": 0.99, "tau": 0.005}
    d = damo.Args()
    assert (plain["alpha"], plain["bc_coef"], plain["gamma"], plain["tau"]) == (0.5, d.bc_coef, 0.99, 0.005)
    assert (given["alpha"], given["bc_coef"], given["gamma"], given["tau"]) == (5.0, d.bc_coef, 0.99, 0.02)
    assert damo.ENV_DEFAULTS["walker2d"]["alpha"] != damo.ENV_DEFAULTS["walker2d-medium-expert"]["alpha"]
    # the dataset's row sets alpha; gamma and tau still come from its environment's row
    assert (w2d["alpha"], w2d["bc_coef"], w2d["gamma"], w2d["tau"]) == (
        damo.ENV_DEFAULTS["walker2d-medium-expert"]["alpha"], d.bc_coef, 0.99, 0.005)


def test_eval_every_evaluates_every_kth_epoch_and_the_last(minari_root, tmp_path):
    p = run_cli(["--env-id", "mujoco/hopper/medium-v0", "--bc", "--runs-dir", str(tmp_path), "--run-name", "k",
                 "--no-download", *flags(epochs=5, eval_every=2)], minari_root)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "k" / "eval.csv")))
    assert [int(r["epoch"]) for r in rows] == [2, 4, 5]
    res = json.load(open(tmp_path / "k" / "results.json"))
    assert res["final_normalized_score"] == pytest.approx(float(rows[-1]["normalized_score"]), abs=1e-3)


def test_env_defaults_apply_only_where_the_flag_is_not_given():
    a = damo.Args()
    assert damo.with_env_defaults(a, "halfcheetah").alpha == 0.5
    assert damo.with_env_defaults(damo.Args(alpha=5.0), "halfcheetah").alpha == 5.0  # given, though hopper's value
    assert damo.with_env_defaults(a, "hopper").alpha == 5.0
    assert damo.with_env_defaults(a, "mujoco-ant").alpha == 5.0  # another family: hopper's values
    # a dataset's own row wins over its family's, whichever form names it
    w2d_me = damo.ENV_DEFAULTS["walker2d-medium-expert"]["alpha"]
    for source in ("walker2d-medium-expert", "mujoco/walker2d/medium-expert-v0", "/data/walker2d_medium_expert-v2.hdf5"):
        assert damo.dataset_name(source) == "walker2d-medium-expert"
        assert damo.with_env_defaults(a, "walker2d", damo.dataset_name(source)).alpha == w2d_me != 5.0
    assert damo.with_env_defaults(a, "walker2d", damo.dataset_name("mujoco/walker2d/medium-v0")).alpha == 5.0
    assert damo.with_env_defaults(damo.Args(alpha=5.0), "walker2d", "walker2d-medium-expert").alpha == 5.0
    # the same equations everywhere: the table holds coefficients only (no switch of a term)
    assert {k for table in damo.ENV_DEFAULTS.values() for k in table} == {"alpha", "gamma", "tau"}
    hopper, w2d_me_args = damo.with_env_defaults(a, "hopper"), damo.with_env_defaults(a, "walker2d", "walker2d-medium-expert")
    assert (hopper.gamma, hopper.tau) == (0.995, 0.02) and (w2d_me_args.gamma, w2d_me_args.tau) == (0.99, 0.005)
    assert damo.with_env_defaults(damo.Args(gamma=0.99), "hopper").gamma == 0.99  # given: kept
    import plot

    hc = {"family": "halfcheetah", "env_id": "halfcheetah-medium"}
    assert plot.variant_label(asdict_args(**hc), "halfcheetah") == "DAMO"
    assert plot.variant_label(asdict_args(bc_coef=0.0, **hc), "halfcheetah") == "DAMO (bc_coef=0)"
    assert plot.variant_label(asdict_args(bc_filter=False, **hc), "halfcheetah") == "DAMO (bc_filter=0)"
    assert plot.variant_label(asdict_args(alpha=0.0, bc_coef=0.0, **hc), "halfcheetah") == "w/o ir"  # eta inert
    assert plot.variant_label(asdict_args(gamma=0.99, tau=0.005), "hopper") == "DAMO (gamma=0.99, tau=0.005)"
    assert plot.variant_label(asdict_args(alpha=0.5), "hopper") == "DAMO (alpha=0.5)"
    assert plot.variant_label(asdict_args(alpha_ent_lr=1e-4), "hopper") == "DAMO (alpha_ent_lr=0.0001)"
    assert plot.variant_label(asdict_args(actor_lr_schedule="cosine"), "hopper") == "DAMO (actor_lr_schedule=cosine)"
    peer = damo.with_env_defaults(damo.Args(penalty="mopo"), "hopper", "hopper-medium-expert")
    mopo = asdict(damo.with_peer_settings(peer, "hopper-medium-expert", {"penalty"}))  # as a MOPO run records it
    assert mopo["actor_lr_schedule"] == "cosine"  # the peers' schedule is MOPO's own default: no label
    assert plot.variant_label(mopo, "hopper") == "MOPO"
    assert plot.variant_label({**mopo, "actor_lr_schedule": "constant"}, "hopper") == "MOPO (actor_lr_schedule=constant)"
    w2d_me = {"env_id": "walker2d-medium-expert"}
    assert plot.variant_label(asdict_args("walker2d", **w2d_me), "walker2d") == "DAMO"
    assert plot.variant_label(asdict_args("walker2d", alpha=5.0, **w2d_me), "walker2d") == "DAMO (alpha=5)"
    assert plot.variant_label(asdict_args("walker2d", env_id="walker2d-medium"), "walker2d") == "DAMO"


def asdict_args(family: str = "hopper", **kw) -> dict:
    from dataclasses import asdict

    a = damo.Args(**kw)  # unspecified: the values a run on that family's data records
    return asdict(damo.with_env_defaults(a, family, damo.dataset_name(a.env_id)))


def test_cli_unknown_env_id(tmp_path):
    p = run_cli(["--env-id", "hopper-medium-replayy", "--runs-dir", str(tmp_path)], tmp_path)
    assert p.returncode == 2
    assert "unknown --env-id 'hopper-medium-replayy'" in p.stderr and "hopper-medium-expert" in p.stderr
    assert "Traceback" not in p.stderr


BAD_FLAGS = [("--rollout-length", "0"), ("--batch-size", "0"), ("--n-elites", "9"), ("--rollout-batch-size", "0"),
             ("--rollout-freq", "0"), ("--hidden", "0"), ("--epochs", "0"), ("--steps-per-epoch", "0"),
             ("--eval-episodes", "0"), ("--gamma", "1.5"), ("--tau", "2"), ("--logit-clip", "-1"), ("--alpha", "-1"),
             ("--real-ratio", "0"), ("--actor-lr", "0"), ("--dynamics-max-epochs", "0"), ("--n-critics", "-2"),
             ("--snapshot-every", "-1"), ("--heldout-episodes", "1001"), ("--heldout-episodes", "-1"),
             ("--penalty-coef", "-1"), ("--alpha-ent-fixed", "0")]


def test_cli_bad_flag_values_exit_2_before_any_work(tmp_path):
    """Each value that cannot work: exit 2, one `error:` line naming the flag and value, no traceback, no
    run folder."""
    results = run_many("damo.py", [[flag, value, "--runs-dir", str(tmp_path / "runs")] for flag, value in BAD_FLAGS],
                       tmp_path)
    for (flag, value), (code, err) in zip(BAD_FLAGS, results):
        error_line(code, err, flag, value, "allowed")
    assert not (tmp_path / "runs").exists()
    # and once as a user meets it, in a process of its own
    p = run_cli(["--batch-size", "0", "--runs-dir", str(tmp_path / "runs")], tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "error: --batch-size 0" in p.stderr


def test_cli_bad_inputs_fail_before_the_run_folder_exists(minari_root, e2e_run, tmp_path):
    """Data, --dynamics-path, --resume, --runs-dir, --run-name and --seed: each bad one is refused with
    exit 2 and one error line that names it, and leaves nothing behind (no run folder, the old run intact)."""
    import minari

    import h5py

    with h5py.File(tmp_path / "hopper_empty-v2.hdf5", "w") as f:  # D4RL's layout, 0 rows
        for k in damo.D4RL_KEYS:
            f[k] = np.zeros((0, 11) if "observations" in k else (0, 3) if k == "actions" else (0,), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(dataset_id="mujoco/hopper/empty-v0", buffer=[], env="Hopper-v5",
                                           algorithm_name="none", author="test", description="0 steps")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "old").mkdir()
    shutil.copytree(e2e_run, tmp_path / "old" / "e2e")
    old = tmp_path / "old" / "e2e"
    before = {str(p.relative_to(old)): p.read_bytes() for p in old.rglob("*") if p.is_file()}
    tiny = [*flags(), "--no-download"]
    runs = str(tmp_path / "runs")
    cases = [
        (["--dataset-path", str(tmp_path / "hopper_empty-v2.hdf5"), "--env-id", "hopper-medium"], ["no transitions", "0 rows"]),
        (["--env-id", "mujoco/hopper/empty-v0"], ["no transitions", "make_dataset.py"]),
        (["--dynamics-path", str(tmp_path / "missing.pt")], ["--dynamics-path", "no such file"]),
        (["--env-id", "mujoco/hopper/medium-v0", "--dynamics-path", str(e2e_run / "dynamics.pt")],
         ["--dynamics-path", "expert-v0", "drop the flag"]),  # an ensemble of other data
        (["--dynamics-path", str(e2e_run / "eval.csv")], ["--dynamics-path", "cannot read"]),
        (["--dynamics-path", str(e2e_run / "dynamics.pt"), "--dynamics-hidden", "64"], ["other sizes", "--dynamics-hidden"]),
        (["--runs-dir", "/proc/damo-runs"], ["--runs-dir", "cannot be written"]),
        (["--runs-dir", str(tmp_path / "a_file")], ["--runs-dir", "is a file"]),
        (["--runs-dir", str(tmp_path / "old"), "--run-name", "e2e"], ["--run-name e2e", "--resume"]),
        (["--seed", "-1"], ["--seed -1", "allowed"]),
        (["--resume", str(tmp_path / "old" / "e2e" / "eval.csv")], ["--resume", "is a file", "folder"]),
        (["--resume", str(tmp_path / "old" / "e2e" / "checkpoint.pt")], ["already finished at step 200", "--epochs"]),
        (["--env-id", "hopper-medium-replay"], ["medium-replay", "make_dataset.py --mix"]),
    ]
    argvs = [argv if "--resume" in argv else [*tiny, *argv] if "--runs-dir" in argv else [*tiny, "--runs-dir", runs, *argv]
             for argv, _ in cases]
    for (argv, must), (code, err) in zip(cases, run_many("damo.py", argvs, minari_root)):
        error_line(code, err, *must)
    assert not (tmp_path / "runs").exists() and not os.path.exists("/proc/damo-runs")
    assert {str(p.relative_to(old)): p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path / "old")) == ["e2e"]


def test_make_dataset_bad_inputs_fail_before_any_rollout(tmp_path):
    """make_dataset.py: the env id, the dataset id's form, the step count, the policy against the env and
    an existing id are all checked before the first rollout; nothing is written."""
    (tmp_path / "text.npz").write_text("not weights")
    hop, hc = str(POLICIES / "hopper-medium.npz"), str(POLICIES / "halfcheetah-sac-20k.npz")
    root = tmp_path / "minari"
    cases = [
        (["--policy", str(tmp_path / "missing.npz")], ["missing.npz", "does not exist"]),
        (["--policy", str(tmp_path / "text.npz")], ["text.npz", "not a .npz"]),
        (["--policy", hc], ["17-d observations", "Hopper-v5 has 11", "--env-id"]),
        (["--env-id", "Hoper-v5", "--policy", hop], ["--env-id Hoper-v5", "Hopper"]),
        (["--dataset-id", "hopper-medium", "--policy", hop], ["--dataset-id 'hopper-medium'", "namespace/name-vN"]),
        (["--dataset-id", "mujoco/hopper/noise0.3-v0"], ["'mujoco/hopper/noise0.3-v0'", "letters, digits, - and _"]),
        (["--action-noise", "nan"], ["--action-noise nan", ">= 0"]),
        (["--steps", "0"], ["--steps 0"]),
        (["--steps", "-5"], ["--steps -5"]),
        (["--mix", "random:0"], ["random:0", "STEPS >= 1"]),
        (["--dataset-id", "mujoco/hopper/exists-v0", "--steps", "10000000"], ["already exists", "--overwrite"]),
    ]
    argvs = [["--dataset-id", "mujoco/hopper/new-v0", "--steps", "20", *argv] for argv, _ in cases]
    os.makedirs(root / "mujoco" / "hopper" / "exists-v0")
    t0 = time.time()
    for (argv, must), (code, err) in zip(cases, run_many("make_dataset.py", argvs, root)):
        error_line(code, err, *must)
    assert time.time() - t0 < 120  # the existing id is refused before 10M steps are rolled
    assert sorted(os.listdir(root / "mujoco" / "hopper")) == ["exists-v0"]  # nothing new, no empty folder
    assert not (root / "hopper-medium").exists()


def test_plot_bad_inputs(minari_root, e2e_run, tmp_path):
    """plot.py: non-finite scores are refused (the run skipped with its reason; none left: exit 2), an
    unwritable --out and a missing runs folder are named."""
    runs = tmp_path / "runs"
    shutil.copytree(e2e_run, runs / "nan")
    with open(runs / "nan" / "eval.csv", "a") as f:
        f.write("300,3,inf,0,nan,0,1\n")
    cases = [([str(runs), "--out", str(tmp_path / "c")], ["no readable runs"]),
             ([str(e2e_run.parent), "--out", "/proc/damo-fig/curves"], ["--out", "cannot be written"]),
             ([str(tmp_path / "nowhere"), "--out", str(tmp_path / "c")], ["nowhere", "does not exist"])]
    results = run_many("plot.py", [argv for argv, _ in cases], minari_root)
    for (argv, must), (code, err) in zip(cases, results):
        error_line(code, err, *must)
    assert "non-finite" in results[0][1] and "nan" in results[0][1]
    assert not list(tmp_path.glob("c.*"))


def test_check_args_accepts_the_defaults_and_edges():
    damo.check_args(damo.Args())
    damo.check_args(damo.Args(gamma=1.0, tau=1.0, real_ratio=1.0, alpha=0.0, beta=0.0, bc_coef=0.0, n_elites=7))
    with pytest.raises(damo.DamoError, match="--tau 0.0"):
        damo.check_args(damo.Args(tau=0.0))


@pytest.mark.parametrize("download", [True, False])
def test_cli_missing_dataset_offline_fails_fast(tmp_path, download):
    empty = tmp_path / "empty"
    empty.mkdir()
    t0 = time.time()
    p = run_cli(["--env-id", "walker2d-medium", "--runs-dir", str(tmp_path)] + ([] if download else ["--no-download"]),
                empty, timeout=120)
    assert time.time() - t0 < 60
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "mujoco/walker2d/medium" in p.stderr and str(empty) in p.stderr and "minari download" in p.stderr


def test_cli_non_finite_loss_stops_and_keeps_files(minari_root, tmp_path):
    p = run_cli(["--env-id", "mujoco/hopper/medium-v0", "--runs-dir", str(tmp_path), "--run-name", "nan",
                 "--no-download", "--critic-lr", "1e30", "--actor-lr", "1e30", *TINY, "--log-every", "10"], minari_root)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "non-finite" in p.stderr and "at gradient step" in p.stderr
    run = tmp_path / "nan"
    assert (run / "config.json").exists() and (run / "eval.csv").exists() and (run / "dynamics.pt").exists()


# --------------------------------------------------------------------------------------------------
# learning: DAMO must improve on its data (issue: a learning test in CI)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env_id", ["Hopper-v5", pytest.param("HalfCheetah-v5", marks=pytest.mark.slow)])
def test_batched_evaluation_equals_sequential(env_id):
    """The lockstep evaluation gives every episode the return it has when run alone (same seed), also
    when episodes end at different steps (Hopper falls), for an untrained and a perturbed actor."""
    env = gym.make(env_id)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    torch.manual_seed(1)
    actor = damo.Actor(obs_dim, act_dim, 64)
    mean, std = torch.zeros(obs_dim), torch.ones(obs_dim)
    envs = damo.make_eval_envs(env, 4)
    batched = damo.evaluate(actor, envs, 500, mean, std, "cpu")
    alone = np.array([damo.evaluate(actor, [gym.make(env_id)], 500 + k, mean, std, "cpu")[0] for k in range(4)])
    np.testing.assert_allclose(batched, alone, rtol=1e-9)  # float64 rounding of the sums only
    assert len(set(batched.round(6))) == 4  # the seeds differ, so do the episodes
    # and a second call on the same envs gives the same returns again (resets, no leftover state)
    np.testing.assert_array_equal(damo.evaluate(actor, envs, 500, mean, std, "cpu"), batched)
    # observation noise (--eval-only --obs-noise): episode k's draws do not depend on the batch either
    noisy = damo.evaluate(actor, envs, 500, mean, std, "cpu", obs_noise=0.5)
    alone = [damo.evaluate(actor, [gym.make(env_id)], 500 + k, mean, std, "cpu", obs_noise=0.5)[0] for k in range(4)]
    np.testing.assert_allclose(noisy, alone, rtol=1e-9)
    assert not np.allclose(noisy, batched)  # the noise reaches the policy


@pytest.mark.parametrize("real_ratio", [0.5, 0.05])
def test_damo_update_batch_mask_and_target_rate(monkeypatch, real_ratio):
    """One damo_update, its losses watched by name: B holds round(real_ratio * B) offline rows first, then
    synthetic ones; Eq. 4 corrects exactly the synthetic rows' rewards, by beta * clip(logit D); with
    few offline rows the push-up term gets an offline batch of its own; the targets move by tau."""
    torch.manual_seed(0)
    args = damo.with_env_defaults(damo.Args(hidden=32, disc_hidden=32, dynamics_hidden=32, batch_size=64, beta=0.3,
                                            logit_clip=0.5, real_ratio=real_ratio, tau=0.1), "hopper")
    ag = damo.make_agent(11, 3, args, "cpu")
    rows = 300
    D = {"obs": torch.randn(rows, 11), "act": torch.rand(rows, 3) * 2 - 1, "rew": torch.full((rows,), 1.0),
         "next_obs": torch.randn(rows, 11), "done": torch.zeros(rows)}
    synthetic = damo.SyntheticBuffer(rows, 11, 3, "cpu")
    synthetic.add({**{k: v + 5.0 for k, v in D.items()}, "rew": torch.full((rows,), -1.0), "done": torch.zeros(rows)})
    seen = {}
    plain_critic_loss = damo.critic_loss

    def watch(critic, target, actor, log_alpha_ent, batch, n_real, offline, *rest):
        seen.update(batch={k: v.clone() for k, v in batch.items()}, n_real=n_real, offline=offline)
        return plain_critic_loss(critic, target, actor, log_alpha_ent, batch, n_real, offline, *rest)

    monkeypatch.setattr(damo, "critic_loss", watch)
    target_before = [p.clone() for p in ag.critic_target.parameters()]
    info = damo.damo_update(ag, D, synthetic, args)
    b, n_real = seen["batch"], seen["n_real"]
    assert n_real == round(64 * real_ratio) and len(b["rew"]) == 64
    is_offline = b["obs"].abs().max(1).values < 4.5  # synthetic rows were shifted by +5
    assert torch.equal(is_offline, torch.arange(64) < n_real)
    assert torch.equal(b["rew"][:n_real], torch.ones(n_real))  # offline rows keep their reward
    with torch.no_grad():  # the classifier after its step in this update: Eq. 4 on the synthetic rows
        logit = ag.disc(b["obs"][n_real:], b["act"][n_real:], b["next_obs"][n_real:]).clamp(-0.5, 0.5)
    assert torch.allclose(b["rew"][n_real:], -1.0 + 0.3 * logit, atol=1e-6)
    assert (b["rew"][n_real:] != -1.0).all()
    assert (seen["offline"] is None) == (real_ratio == 0.5)  # a separate offline batch only when B has few offline rows
    if seen["offline"] is not None:
        assert len(seen["offline"]["obs"]) == 64 and (seen["offline"]["obs"].abs().max(1).values < 4.5).all()
    assert float(info["reward_bonus_synthetic"]) == pytest.approx(float(0.3 * logit.mean()), abs=1e-6)
    for before, after, online in zip(target_before, ag.critic_target.parameters(), ag.critic.parameters()):
        assert torch.allclose(after, 0.9 * before + 0.1 * online, atol=1e-6)  # Polyak, tau = 0.1


def test_algorithm_part_reads_without_plumbing():
    """damo.py is Algorithm 1 first and the plumbing after it: the part before the appendix is at most 1,000
    lines, normalisation is in the data section, and loading, logging and checkpoint code is in the appendix."""
    head, marker, appendix = (HERE / "damo.py").read_text().partition("\n# Appendix: plumbing")
    assert marker and head.count("\n") <= 1000, head.count("\n")
    for name in ("def load_dataset(", "def load_d4rl_hdf5(", "class History", "class RunLog", "AGENT_MODULES",
                 "def save_checkpoint(", "def after_step("):
        assert name in appendix and name not in head, name
    data_section = head[head.index("# 2. Data"): head.index("# 3. Networks")]
    assert "def prepare_data(" in data_section and "obs_std" in data_section


def test_sample_rows_keeps_rows_aligned():
    data = {"a": torch.arange(100.0), "b": torch.arange(100.0) * 2, "c": torch.arange(100.0)[:, None].expand(100, 3)}
    rows = damo.sample_rows(data, 500)
    assert torch.equal(rows["b"], 2 * rows["a"]) and torch.equal(rows["c"][:, 2], rows["a"])
    assert rows["a"].max() >= 90 and damo.sample_rows(data, 500, size=10)["a"].max() < 10  # `size`: the first rows only


@pytest.mark.slow
def test_damo_learns_beyond_cloning_on_replay_like_hopper_data(tmp_path, monkeypatch):
    """damo.py's defaults (only budget and size flags: 64-wide networks, a smaller ensemble and rollout batch,
    to fit a few minutes on 2 cores), trained for 10,000 gradient steps, two seeds side by side, on
    replay-like Hopper-v5 data: 10,000 uniform random steps, then 10,000 of the sampled medium policy
    (average episode return about 86, most episodes being the random ones). Behaviour cloning, trained the
    same way on the same data, fits the mean of both behaviours and falls at once (about 50); a critic can
    tell the medium policy's actions from the random ones, and Eq. 7b clones only the actions it ranks
    higher. Over the two seeds, the mean of the last three evaluations must lie above the data's average,
    far above the untrained policy and 150 above behaviour cloning's. Single evaluations swing, so the
    statistic averages seeds and evaluations; a DAMO whose actor only clones (no Q term, no filter), an
    actor that descends Q (sign flipped) or a critic that is not trained fails it (docs/evidence.md)."""
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, returns = make_dataset.make_dataset(make_dataset.Args(
            dataset_id="mujoco/hopper/replaylike-v0", seed=0,
            mix=("random:10000", f"{POLICIES / 'hopper-medium.npz'}:10000")))
    data_return = float(returns.mean())  # the data's average episode return
    common = ["--env-id", "mujoco/hopper/replaylike-v0", "--hidden", "64", "--epochs", "10", "--steps-per-epoch", "1000",
              "--eval-episodes", "5", "--threads", "1", "--no-download", "--runs-dir", str(tmp_path)]
    # size flags only: every loss weight and rate is damo.py's default for hopper
    damo_flags = ["--dynamics-hidden", "64", "--rollout-batch-size", "5000", "--dynamics-max-epochs", "10"]
    env = {**os.environ, "MINARI_DATASETS_PATH": str(root), **OFFLINE_ENV, "PYTHONWARNINGS": "ignore"}
    for variant in (damo_flags, ["--bc"]):  # two seeds side by side, one thread each
        procs = [subprocess.Popen([sys.executable, str(HERE / "damo.py"), *common, *variant, "--seed", str(s),
                                   "--run-name", f"{'bc' if variant == ['--bc'] else 'learn'}{s}"], env=env, cwd=HERE,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for s in (0, 1)]
        for p in procs:
            _, err = p.communicate(timeout=900)
            assert p.returncode == 0, err[-3000:]
    curve = {name: [float(r["return_mean"]) for r in csv.DictReader(open(tmp_path / name / "eval.csv"))]
             for name in ("learn0", "learn1", "bc0", "bc1")}
    assert all(len(c) == 10 for c in curve.values())
    ck = torch.load(tmp_path / "learn0" / "checkpoint.pt", weights_only=False)
    torch.manual_seed(0)
    untrained = damo.evaluate(damo.Actor(11, 3, 64), [gym.make("Hopper-v5") for _ in range(5)], 10_000,
                              ck["obs_mean"], ck["obs_std"], "cpu").mean()
    final = np.mean([curve["learn0"][-3:], curve["learn1"][-3:]])
    bc = np.mean([curve["bc0"][-3:], curve["bc1"][-3:]])
    assert final >= data_return, (final, data_return, curve)
    assert final >= untrained + 150, (final, untrained, curve)
    assert final >= bc + 150, (final, bc, curve)


# --------------------------------------------------------------------------------------------------
# plot.py
# --------------------------------------------------------------------------------------------------


def run_plot(args: list[str], root):
    env = {**os.environ, "MINARI_DATASETS_PATH": str(root), **OFFLINE_ENV, "PYTHONWARNINGS": "default"}
    return subprocess.run([sys.executable, str(HERE / "plot.py"), *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=HERE)


def test_plot_curves_table_and_corrupt_runs(minari_root, e2e_run, tmp_path):
    import shutil

    runs = tmp_path / "runs"
    for seed in (3, 4):  # two seeds of one variant, and a BC run with a different eval grid
        d = runs / f"damo_{seed}"
        shutil.copytree(e2e_run, d)
        cfg = json.load(open(d / "config.json"))
        cfg["args"]["seed"] = seed
        json.dump(cfg, open(d / "config.json", "w"))
    bc = runs / "bc_0"
    shutil.copytree(e2e_run, bc)
    cfg = json.load(open(bc / "config.json"))
    cfg["args"].update(bc=True, seed=0)
    json.dump(cfg, open(bc / "config.json", "w"))
    with open(bc / "eval.csv", "w") as f:
        f.write("global_step,epoch,return_mean,return_std,normalized_score,normalized_score_std,wall_time_s\n"
                "50,1,100,1,3.7,0.1,1\n150,2,300,1,9.8,0.1,2\n250,3,500,1,16.0,0.1,3\n")
    (runs / "corrupt").mkdir()
    (runs / "corrupt" / "config.json").write_text("{not json")
    (runs / "corrupt" / "eval.csv").write_text("global_step\n")
    (runs / "starting").mkdir()
    shutil.copy(e2e_run / "config.json", runs / "starting" / "config.json")
    (runs / "starting" / "eval.csv").write_text("global_step,epoch,return_mean,return_std,normalized_score,normalized_score_std,wall_time_s\n")
    p = run_plot([str(runs), "--out", str(tmp_path / "fig" / "curves"), "--band", "ci95"], minari_root)
    assert p.returncode == 0, p.stderr[-3000:]
    png = (tmp_path / "fig" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (tmp_path / "fig" / "curves.pdf").stat().st_size > 1000
    assert "corrupt" in p.stderr and "starting" in p.stderr  # skipped with a warning naming them
    rows = list(csv.DictReader(open(e2e_run / "eval.csv")))
    final = float(rows[-1]["normalized_score"])
    held = json.load(open(e2e_run / "results.json"))["heldout"]["normalized_score"]  # the held-out column first
    assert f"| hopper-medium-expert | DAMO (rollout_length=3) | 2 | {held:.1f} +- 0.0 (2) | {final:.1f} +- 0.0 |" in p.stdout
    assert (f"| hopper-medium-expert | BC | 1 | {held:.1f} +- 0.0 (1) | 16.0 +- 0.0 | 9.8 +- 0.0 | 500.0 +- 0.0 | "
            f"300.0 +- 0.0 |") in p.stdout


AGG_X = {"hopper-medium": [40.0, 55.0, 61.0, 47.0], "walker2d-medium": [10.0, 12.0, 30.0, 11.0],
         "halfcheetah-medium": [80.0, 70.0, 95.0, 88.0]}
AGG_Y = {"hopper-medium": [42.0, 38.0, 50.0, 45.0], "walker2d-medium": [12.0, 9.0, 14.0, 11.0],
         "halfcheetah-medium": [75.0, 72.0, 77.0, 90.0]}


def write_scored_run(root, env_id: str, variant: str, seed: int, score: float):
    """A finished run folder as plot.py reads it: config.json, one evaluation (score 1) and a held-out score."""
    d = root / f"{env_id}__{variant}__{seed}"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"args": {"env_id": env_id, "seed": seed, "bc": variant == "bc"},
                                               "data": {"env_family": env_id.split("-")[0]}}))
    (d / "eval.csv").write_text("global_step,epoch,return_mean,return_std,normalized_score,"
                                "normalized_score_std,wall_time_s\n1000,1,1,0,1,0,1\n")
    (d / "results.json").write_text(json.dumps({"heldout": {"normalized_score": score, "episodes": 100}}))


def test_aggregate_statistics_match_hand_computation():
    """IQM, its stratified bootstrap interval and the probability of improvement against a by-hand numpy
    computation on made-up scores (3 datasets x 4 runs)."""
    import plot

    X, Y = [np.array(v) for v in AGG_X.values()], [np.array(v) for v in AGG_Y.values()]
    # IQM: the 12 pooled scores sorted, the lowest 3 and highest 3 dropped
    assert plot.iqm(*X) == pytest.approx(np.sort(np.concatenate(X))[3:9].mean())
    # the interval: resample each dataset's runs within that dataset, 95% percentile interval of the IQM
    rng, boots = np.random.default_rng(1), []
    for _ in range(20000):
        res = np.concatenate([x[rng.integers(0, len(x), len(x))] for x in X])
        boots.append(np.sort(res)[3:9].mean())
    lo, hi = np.percentile(boots, [2.5, 97.5])
    plo, phi = plot.stratified_interval(plot.iqm, X, 20000, 0)
    assert plo == pytest.approx(lo, abs=0.6) and phi == pytest.approx(hi, abs=0.6) and hi - lo > 5
    # pooled (unstratified) resampling gives another interval: the strata matter here
    pooled = np.concatenate(X)
    flat = [np.sort(pooled[rng.integers(0, 12, 12)])[3:9].mean() for _ in range(20000)]
    assert np.percentile(flat, 2.5) < lo - 2
    # P(X > Y): per dataset the share of run pairs with x > y (ties 1/2), averaged over datasets
    by_hand = np.mean([sum((a > b) + 0.5 * (a == b) for a in x for b in y) / 16 for x, y in zip(X, Y)])
    assert plot.probability_of_improvement(*X, *Y) == pytest.approx(by_hand)
    assert plot.probability_of_improvement(np.array([3.0, 4.0]), np.array([1.0, 2.0]), np.array([1.0, 2.0]),
                                           np.array([1.0, 3.0])) == pytest.approx((1.0 + 0.375) / 2)
    assert np.isnan(plot.stratified_interval(plot.iqm, [np.array([1.0]), np.array([2.0, 3.0])], 200, 0)[0])


def test_plot_aggregate_from_run_folders(tmp_path):
    """`plot.py aggregate RUNS` reads the held-out scores from run folders (a run without one is named and
    left out), prints the per-dataset, IQM and probability-of-improvement tables with the numbers of the
    statistics above, and draws the interval figure."""
    import plot

    runs = tmp_path / "runs"
    for variant, table in (("bc", AGG_X), ("damo", AGG_Y)):
        for env_id, scores in table.items():
            for seed, score in enumerate(scores):
                write_scored_run(runs, env_id, variant, seed, score)
    extra = runs / "hopper-medium-replay__bc__0"  # a dataset only BC has: in its row, not in the IQMs
    shutil.copytree(runs / "hopper-medium__bc__0", extra)
    (extra / "results.json").write_text(json.dumps({"heldout": {"normalized_score": 99.0, "episodes": 100}}))
    cfg = json.loads((extra / "config.json").read_text())
    cfg["args"]["env_id"] = "hopper-medium-replay"
    (extra / "config.json").write_text(json.dumps(cfg))
    old = runs / "hopper-medium__damo__9"  # finished before held-out scores existed
    shutil.copytree(runs / "hopper-medium__damo__0", old)
    (old / "results.json").write_text("{}")
    p = run_plot(["aggregate", str(runs), "--out", str(tmp_path / "agg"), "--resamples", "500"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "1 finished runs have no held-out score" in p.stderr and "--heldout" in p.stderr
    X, Y = [np.array(v) for v in AGG_X.values()], [np.array(v) for v in AGG_Y.values()]
    lo, hi = plot.stratified_interval(plot.iqm, X, 500, 0)
    assert f"| BC | 3 | 12 | {plot.iqm(*X):.1f} | [{lo:.1f}, {hi:.1f}] |" in p.stdout, p.stdout
    assert f"| {plot.probability_of_improvement(*Y, *X):.2f} | DAMO | BC | 3 |" in p.stdout
    assert "| BC | DAMO |" not in p.stdout  # each pair once, DAMO first
    assert "| hopper-medium-replay |  | 99.0 +- 0.0 (1) |" in p.stdout and "leave out hopper-medium-replay" in p.stderr
    x, y = AGG_X["hopper-medium"], AGG_Y["hopper-medium"]  # one row per dataset, a column per variant
    assert (f"| hopper-medium | {np.mean(y):.1f} +- {np.std(y):.1f} (4) | **{np.mean(x):.1f} +- {np.std(x):.1f} (4)** |"
            in p.stdout), p.stdout
    agg = json.load(open(tmp_path / "agg.json"))
    assert agg["per_dataset"][0]["last10"] == [1.0] * 4  # the training evaluations' last-10 beside (eval.csv: 1)
    assert [t["variant"] for t in agg["iqm"]] == ["DAMO", "BC"] and (tmp_path / "agg.png").read_bytes()[:4] == b"\x89PNG"
    bad = run_plot(["aggregate", str(runs), "--resamples", "10"], tmp_path)
    error_line(bad.returncode, bad.stderr, "--resamples 10")
    # --variants keeps the listed ones: BC alone ranks on all four of its datasets (hopper-medium-replay too)
    one = run_plot(["aggregate", str(runs), "--out", str(tmp_path / "bc"), "--resamples", "500", "--variants", "bc"],
                   tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "| BC | 4 | 13 |" in one.stdout and "DAMO" not in one.stdout and "leave out" not in one.stderr
    bad = run_plot(["aggregate", str(runs), "--variants", "DAMO", "MOBILE"], tmp_path)
    error_line(bad.returncode, bad.stderr, "--variants MOBILE")
    assert "DAMO, BC" in bad.stderr


def test_plot_aggregate_joins_an_earlier_aggregates_json(tmp_path):
    """An aggregate's JSON keeps every run's score and seed: given as RUNS it stands for those runs (the same
    statistics again, a fixed point), and it joins run folders from elsewhere (more seeds of a row); a run
    given twice, a JSON row without seeds beside runs of its row, the same input twice and a file that is
    not an aggregate's JSON are refused in one line."""
    runs, more = tmp_path / "runs", tmp_path / "more"
    for variant, table in (("bc", AGG_X), ("damo", AGG_Y)):
        for env_id, scores in table.items():
            for seed, score in enumerate(scores[:3]):
                write_scored_run(runs, env_id, variant, seed, score)
    write_scored_run(more, "hopper-medium", "damo", 3, AGG_Y["hopper-medium"][3])  # the fourth seed, run elsewhere
    first = run_plot(["aggregate", str(runs), "--out", str(tmp_path / "a"), "--resamples", "500"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    agg = json.loads((tmp_path / "a.json").read_text())
    assert agg["per_dataset"][0]["run_seeds"] == [0, 1, 2] and agg["per_dataset"][0]["last10"] == [1.0] * 3
    again = run_plot(["aggregate", str(tmp_path / "a.json"), "--out", str(tmp_path / "b"), "--resamples", "500"], tmp_path)
    assert again.returncode == 0 and again.stdout == first.stdout, (again.stderr[-2000:], again.stdout)
    assert json.loads((tmp_path / "b.json").read_text()) == agg
    joined = run_plot(["aggregate", str(tmp_path / "a.json"), str(more), "--out", str(tmp_path / "c"), "--resamples", "500"],
                      tmp_path)
    assert joined.returncode == 0, joined.stderr[-3000:]
    row = next(r for r in json.loads((tmp_path / "c.json").read_text())["per_dataset"]
               if r["dataset"] == "hopper-medium" and r["variant"] == "DAMO")
    assert row["run_seeds"] == [0, 1, 2, 3] and row["scores"] == AGG_Y["hopper-medium"]
    y = AGG_Y["hopper-medium"]
    assert f"| hopper-medium | {np.mean(y):.1f} +- {np.std(y):.1f} (4) |" in joined.stdout, joined.stdout
    write_scored_run(tmp_path / "dup", "hopper-medium", "damo", 0, 1.0)  # seed 0 is in the JSON already
    for r in agg["per_dataset"]:  # an aggregate's JSON from before seeds were kept
        del r["run_seeds"]
    (tmp_path / "old.json").write_text(json.dumps(agg))
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    refused = run_many("plot.py", [["aggregate", str(tmp_path / "a.json"), str(tmp_path / "dup")],
                                   ["aggregate", str(tmp_path / "old.json"), str(more)],
                                   ["aggregate", str(runs), str(runs)],
                                   ["aggregate", str(tmp_path / "other.json")]], tmp_path)
    for (code, err), must in zip(refused, [("hopper-medium DAMO seed 0 is given twice", "pass each run once"),
                                           ("hopper-medium DAMO seed", "given twice"), ("given twice",),
                                           ("other.json is not the JSON of a `plot.py aggregate`",)]):
        error_line(code, err, *must)


def test_plot_diagnose_writes_figure_and_finite_json(minari_root, e2e_run, tmp_path):
    import torch

    # a checkpoint of an older damo.py: its args hold a flag that no longer exists
    run = copy_run(e2e_run, tmp_path / "old")
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    ck["args"]["a_flag_since_removed"] = 1
    torch.save(ck, run / "checkpoint.pt")
    p = run_plot(["diagnose", str(run)], minari_root)
    assert p.returncode == 0, p.stderr[-3000:]
    stats = json.load(open(run / "diagnostics.json"))
    png = (run / "diagnostics.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 10_000
    nums = [stats[k] for k in ("real_to_offline_state_nn_distance", "synthetic_to_offline_state_nn_distance",
                               "q_start_mean", "target_return_mean", "overestimation_mean", "plain_return_mean")]
    assert all(math.isfinite(x) for x in nums + list(stats["disc_p_offline"].values()))
    assert stats["overestimation_mean"] == pytest.approx(stats["q_start_mean"] - stats["target_return_mean"], abs=1e-6)
    # the run has the entropy backup and beta 0.1: the critic is compared with the soft return of r~
    assert stats["target"].startswith("discounted soft return of the sampling policy, reward r + 0.1 clip(logit D)")
    assert all(0 <= x <= 1 for x in stats["disc_p_offline"].values()) and stats["n_real"] > 0
    assert stats["real_return_mean"] > 0 and math.isfinite(stats["q_filtered_return_mean"])
    assert math.isfinite(stats["random_perturbation_return_mean"])
    # damo.py's own evaluation with its episode seeds: the first episodes are the run's last evaluation
    last = list(csv.DictReader(open(e2e_run / "eval.csv")))[-1]
    assert np.mean(stats["real_returns"][:2]) == pytest.approx(float(last["return_mean"]), abs=1e-3)
    visits = stats["real_states_nearest_source"]  # medium-expert: the two sources' shares sum to 1
    assert visits["mujoco/hopper/medium-v0 (all steps)"] + visits["mujoco/hopper/expert-v0 (all steps)"] == pytest.approx(1)


def test_fair_overestimation_target_by_hand(minari_root, e2e_run):
    """plot.critic_target_return: the sampled episodes' discounted sum of r + beta clip(logit D) - alpha_ent log pi
    (no entropy term for a0), by hand for each episode; with --no-backup-entropy and --beta 0 it is the plain
    discounted return of the same episodes."""

    import plot

    ag, ck = damo.load_agent(str(e2e_run))
    a = damo.saved_args(ck)
    mean, std = ck["obs_mean"], ck["obs_std"]
    norm = lambda x: (torch.as_tensor(x, dtype=torch.float32) - mean) / std  # noqa: E731
    envs = [gym.make("Hopper-v5") for _ in range(2)]

    def run(args):
        torch.manual_seed(5)
        return plot.critic_target_return(ag.actor, ag.critic, ag.disc, args, ck, envs, 7, mean, std, norm)

    soft, plain = run(a), run(replace(a, beta=0.0, backup_entropy=False))
    torch.manual_seed(5)  # the same sampled episodes, recorded here
    rec = []
    damo.evaluate(ag.actor, envs, 7, mean, std, "cpu", record=rec, pick=lambda s: ag.actor.sample(s.float())[0].double())
    alpha_ent = math.exp(float(ck["log_alpha_ent"]))
    assert soft["alpha_ent"] == pytest.approx(alpha_ent) and plain["alpha_ent"] == 0.0
    for k, ep in enumerate(rec):
        plain_sum = sum(a.gamma ** t * x[3] for t, x in enumerate(ep))
        assert plain["target_returns"][k] == pytest.approx(plain_sum, rel=1e-6)
        hand = 0.0
        for t, (o, act, o2, r) in enumerate(ep):
            s, s2, at = norm(o[None]), norm(o2[None]), torch.as_tensor(act[None]).float()
            with torch.no_grad():
                bonus = 0.1 * float(ag.disc(s, at, s2).clamp(-a.logit_clip, a.logit_clip))
                mu, log_std = ag.actor(s)
                u = torch.atanh(at.clamp(-1 + 1e-6, 1 - 1e-6))
                normal = torch.distributions.Normal(mu, log_std.exp())
                logp = float((normal.log_prob(u) - torch.log(1 - torch.tanh(u) ** 2)).sum())
            hand += a.gamma ** t * (r + bonus - (alpha_ent * logp if t > 0 else 0.0))
        assert soft["target_returns"][k] == pytest.approx(hand, rel=1e-3, abs=1e-3)
    assert soft["q_start"] == plain["q_start"]  # the same (s0, a0): only the target differs


def test_plot_data_per_source_table(minari_root):
    import minari

    p = run_plot(["data", "hopper-medium-expert", "0.9"], minari_root)
    assert p.returncode == 0, p.stderr[-3000:]
    for did in ("mujoco/hopper/medium-v0", "mujoco/hopper/expert-v0"):  # recomputed here from the episodes
        eps = list(minari.load_dataset(did).iterate_episodes())
        lens = [len(e.rewards) for e in eps]
        g0 = [sum(0.9 ** t * r for t, r in enumerate(e.rewards)) for e in eps]
        rps = sum(e.rewards.sum() for e in eps) / sum(lens)
        row = next(line for line in p.stdout.splitlines() if line.startswith(f"| {did} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:4] == [str(len(eps)), str(sum(lens)), f"{np.mean(lens):.0f}"]
        assert cells[5] == f"{rps:.2f}" and cells[7] == f"{np.mean(g0):.1f} +- {np.std(g0):.1f}"
    bad = run_plot(["data", "walker"], minari_root)
    assert bad.returncode == 2 and "unknown --env-id 'walker'" in bad.stderr and "Traceback" not in bad.stderr


# --------------------------------------------------------------------------------------------------
# --benchmark
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_benchmark_mode_writes_valid_json(tmp_path):
    p = run_cli(["--benchmark", "--benchmark-repeats", "1", "--hidden", "32", "--dynamics-hidden", "32",
                 "--disc-hidden", "32", "--eval-episodes", "1", "--runs-dir", str(tmp_path), "--no-cuda"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])  # the JSON is the last line
    assert res == json.load(open(tmp_path / "benchmark_cpu.json"))
    for k in ("damo_update_steps_per_s", "sac_update_steps_per_s", "dynamics_train_steps_per_s", "rollout_50k_x5_s",
              "eval_10_episodes_s"):
        assert math.isfinite(res[k]) and res[k] > 0, k
    assert res["device"] == "cpu" and res["env"] == "Hopper-v5"
    assert res["damo_to_sac_ratio"] == pytest.approx(res["damo_update_steps_per_s"] / res["sac_update_steps_per_s"])
    assert "| DAMO update |" in p.stdout


def test_same_seed_same_eval_csv_on_cpu(minari_root, e2e_run, tmp_path):
    """Reproducibility: the same flags and seed on the same CPU give the same evaluations."""
    p = run_cli(["--env-id", "hopper-medium-expert", "--seed", "3", "--runs-dir", str(tmp_path), "--run-name", "again",
                 "--no-download", *TINY], minari_root)
    assert p.returncode == 0, p.stderr[-3000:]

    def rows(run):  # every column but the wall time
        return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in csv.DictReader(open(run / "eval.csv"))]

    assert rows(tmp_path / "again") == rows(e2e_run)


def test_eval_only_reproduces_logged_evaluation_and_rejects_corrupt_checkpoint(minari_root, e2e_run, tmp_path):
    """The seed-3 run's last evaluation, reproduced without --seed (the run's own seed); --seed picks others."""
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes((e2e_run / "checkpoint.pt").read_bytes()[:1000])  # truncated
    refusals = ((["--eval-only", str(e2e_run), "--obs-noise", "-0.1"], "--obs-noise -0.1 is out of range"),
                (["--env-id", "hopper-medium-expert", "--obs-noise", "0.1"], "--eval-only RUN --obs-noise 0.1"),
                (["--eval-only", str(bad)], "cannot load a checkpoint"))
    # all in one process (the imports paid once); --obs-noise: the same episodes (seeds) with a perturbed view,
    # seeded, so a second call repeats it
    evaluated = run_many("damo.py", [
        ["--eval-only", str(e2e_run), "--eval-episodes", "2"], ["--eval-only", str(e2e_run), "--eval-episodes", "2", "--seed", "0"],
        *[["--eval-only", str(e2e_run), "--eval-episodes", "2", "--seed", "3", "--obs-noise", "1"]] * 2,
        *[argv for argv, _ in refusals]], minari_root, stdout=True)
    evaluated, refused = evaluated[:4], evaluated[4:]
    assert all(code == 0 for code, _, _ in evaluated), evaluated
    out, other, n0, n1 = (json.loads(got.strip().splitlines()[-1]) for _, _, got in evaluated)
    last = list(csv.DictReader(open(e2e_run / "eval.csv")))[-1]
    assert out["global_step"] == 200 and out["env"] == "Hopper-v5" and len(out["returns"]) == 2 and out["seed"] == 3
    assert out["return_mean"] == pytest.approx(float(last["return_mean"]), rel=1e-4)
    assert out["normalized_score"] == pytest.approx(float(last["normalized_score"]), rel=1e-4)
    assert other["seed"] == 0 and other["returns"] != out["returns"]
    assert n0["obs_noise"] == 1.0 and n0["returns"] == n1["returns"] and n0["returns"] != out["returns"]
    assert "observation noise 1.0" in evaluated[2][1]  # stderr of the first noisy evaluation
    for (code, err, _), (_, says) in zip(refused, refusals):
        assert code == 2 and says in err and "Traceback" not in err, err[-2000:]


# --------------------------------------------------------------------------------------------------
# long runs: resume after SIGKILL, faults, D4RL files, video
# --------------------------------------------------------------------------------------------------

# 4 epochs of 100 steps, a checkpoint every 150 steps (not on an epoch boundary, so a kill can leave
# evaluations newer than the checkpoint), the e2e run's ensemble (no retraining), small networks.
RESUMABLE = ["--env-id", "hopper-medium-expert", "--seed", "3", "--no-download", "--epochs", "4",
             "--steps-per-epoch", "100", "--log-every", "50", "--rollout-freq", "50", "--rollout-batch-size", "500",
             "--rollout-length", "3", "--eval-episodes", "2", "--threads", "1", "--hidden", "64",
             "--checkpoint-every", "150", "--heldout-episodes", "3"]


def eval_rows(run):  # every column but the wall time
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in csv.DictReader(open(run / "eval.csv"))]


@pytest.fixture(scope="session")
def uninterrupted(minari_root, e2e_run, tmp_path_factory):
    runs = tmp_path_factory.mktemp("resume")
    p = run_cli([*RESUMABLE, "--dynamics-path", str(e2e_run / "dynamics.pt"), "--runs-dir", str(runs),
                 "--run-name", "full"], minari_root)
    assert p.returncode == 0, p.stderr[-3000:]
    return runs / "full"


def tb_steps(run, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run))
    ea.Reload()
    return [e.step for e in ea.Scalars(tag)]


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(minari_root, e2e_run, uninterrupted, tmp_path):
    env = {**os.environ, "MINARI_DATASETS_PATH": str(minari_root), **OFFLINE_ENV, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(HERE / "damo.py"), *RESUMABLE, "--dynamics-path", str(e2e_run / "dynamics.pt"),
           "--runs-dir", str(tmp_path), "--run-name", "killed"]
    proc = subprocess.Popen(cmd, env=env, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run, t0 = tmp_path / "killed", time.time()
    # SIGKILL right after the evaluation at step 200: the checkpoint is at 150, so eval.csv and
    # TensorBoard hold rows the checkpoint does not know, which the resume must drop and redo
    while not ((run / "eval.csv").exists() and len((run / "eval.csv").read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() - t0 < 300, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ck["global_step"] in (150, 300)  # 300 only if the kill came late
    p = run_cli(["--resume", str(run)], minari_root)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed at step {ck['global_step']}" in p.stderr
    # the same evaluations as the uninterrupted run, row for row, none missing or repeated: on CPU with
    # a fixed seed the resumed run is exact (networks, optimisers, buffer and RNG states are restored)
    assert eval_rows(run) == eval_rows(uninterrupted)
    assert [int(r["global_step"]) for r in eval_rows(run)] == [100, 200, 300, 400]
    assert tb_steps(run, "charts/return_mean") == [100, 200, 300, 400]
    assert tb_steps(run, "losses/critic_loss") == list(range(50, 401, 50))
    final = torch.load(run / "checkpoint.pt", weights_only=False)
    ref = torch.load(uninterrupted / "checkpoint.pt", weights_only=False)
    assert final["global_step"] == 400
    assert all(torch.equal(final["actor"][k], ref["actor"][k]) for k in ref["actor"])
    res = json.load(open(run / "results.json"))
    assert res["resumed_at_steps"] == [ck["global_step"]] and res["global_steps"] == 400


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_resume_faults_leave_the_run_intact(minari_root, uninterrupted, tmp_path):
    # a finished run: resuming it needs a larger --epochs
    p = run_cli(["--resume", str(uninterrupted)], minari_root)
    assert p.returncode == 2 and "already finished at step 400" in p.stderr and "--epochs" in p.stderr
    # another env id than the run's: refused, nothing touched
    run = copy_run(uninterrupted, tmp_path / "other_env")
    before = (run / "eval.csv").read_bytes()
    p = run_cli(["--resume", str(run), "--env-id", "walker2d-medium", "--epochs", "5"], minari_root)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "--env-id 'hopper-medium-expert' (asked: 'walker2d-medium')" in p.stderr
    assert (run / "eval.csv").read_bytes() == before
    # a truncated checkpoint: a clear message, the folder unchanged
    run = copy_run(uninterrupted, tmp_path / "truncated")
    (run / "checkpoint.pt").write_bytes((uninterrupted / "checkpoint.pt").read_bytes()[:5000])
    p = run_cli(["--resume", str(run), "--epochs", "5"], minari_root)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "checkpoint.pt cannot be loaded" in p.stderr and "truncated" in p.stderr
    assert (run / "eval.csv").read_bytes() == before
    p = run_cli(["--resume", str(tmp_path / "nowhere")], minari_root)
    assert p.returncode == 2 and "no checkpoint.pt there" in p.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full to make writes fail with ENOSPC")
def test_full_disk_during_checkpoint_keeps_the_previous_one(minari_root, uninterrupted, tmp_path):
    run = copy_run(uninterrupted, tmp_path / "full_disk")
    # the checkpoint's temporary file points at /dev/full: every write to it fails with ENOSPC, as on a full disk
    os.symlink("/dev/full", run / "checkpoint.pt.tmp")
    p = run_cli(["--resume", str(run), "--epochs", "5"], minari_root)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "No space left on device" in p.stderr and "intact" in p.stderr and "--resume" in p.stderr
    assert not os.path.lexists(run / "checkpoint.pt.tmp")
    assert torch.load(run / "checkpoint.pt", weights_only=False)["global_step"] == 400  # the previous one, loadable
    # the failed write was the checkpoint at step 450 (every 150 steps), before the evaluation at 500
    assert [int(r["global_step"]) for r in eval_rows(run)] == [100, 200, 300, 400]
    # with space again, the resume continues from the intact checkpoint
    p = run_cli(["--resume", str(run), "--epochs", "5"], minari_root)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [int(r["global_step"]) for r in eval_rows(run)] == [100, 200, 300, 400, 500]
    assert torch.load(run / "checkpoint.pt", weights_only=False)["global_step"] == 500


def write_d4rl_file(path, data, obs_dim=None):
    """A file in D4RL's -v2 layout: flat arrays, `terminals` and `timeouts` flags."""
    import h5py

    n = len(data["rewards"])
    timeouts = np.zeros(n, dtype=bool)
    ends = np.flatnonzero(~np.isclose(data["next_observations"][:-1], data["observations"][1:]).all(1))
    timeouts[ends[~data["terminals"][ends].astype(bool)]] = True  # episode ends that are not terminations
    timeouts[[n // 2, n - 1]] = ~data["terminals"][[n // 2, n - 1]].astype(bool)  # and a time limit cut there
    obs = data["observations"] if obs_dim is None else np.zeros((n, obs_dim), np.float32)
    with h5py.File(path, "w") as f:
        f["observations"], f["actions"], f["rewards"] = obs, data["actions"], data["rewards"]
        f["next_observations"] = data["next_observations"] if obs_dim is None else obs
        f["terminals"], f["timeouts"] = data["terminals"].astype(bool), timeouts
    return timeouts


def test_d4rl_hdf5_file(minari_root, tmp_path):
    data, _, _ = damo.load_dataset("mujoco/hopper/medium-v0", download=False)
    path = tmp_path / "hopper_medium-v2.hdf5"
    timeouts = write_d4rl_file(path, data)
    d, info, env = damo.load_d4rl_hdf5(str(path), "hopper-medium-expert")
    assert env.spec.id == "Hopper-v5" and info["env_family"] == "hopper" and info["n_transitions"] == 8000
    assert (info["ref_min_score"], info["ref_max_score"]) == damo.D4RL_REF["hopper"] and "D4RL" in info["ref_source"]
    # terminals are the bootstrap mask; timeouts end episodes but still bootstrap
    assert np.array_equal(d["terminals"], data["terminals"]) and timeouts.any() and not d["terminals"][timeouts].any()
    assert info["n_episodes"] == int(data["terminals"].sum() + timeouts.sum())
    p = run_cli(["--dataset-path", str(path), "--runs-dir", str(tmp_path), "--run-name", "d4rl", *TINY, "--epochs", "1",
                 "--hidden", "64"], minari_root)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.load(open(tmp_path / "d4rl" / "results.json"))
    assert res["dataset_ids"] == ["d4rl:hopper_medium-v2.hdf5"] and "D4RL reference" in res["score_reference"]
    assert math.isfinite(res["final_normalized_score"])
    # a file whose shapes do not match its env, and one that is not D4RL's layout
    bad = tmp_path / "hopper_bad-v2.hdf5"
    write_d4rl_file(bad, data, obs_dim=17)
    with pytest.raises(damo.DamoError, match=r"do not match Hopper-v5"):
        damo.load_d4rl_hdf5(str(bad), "hopper-medium")
    import h5py

    with h5py.File(tmp_path / "hopper_old-v0.hdf5", "w") as f:
        f["observations"] = data["observations"]
    with pytest.raises(damo.DamoError, match="lacks"):
        damo.load_d4rl_hdf5(str(tmp_path / "hopper_old-v0.hdf5"), "hopper-medium")
    (tmp_path / "hopper_text-v2.hdf5").write_text("not hdf5")
    with pytest.raises(damo.DamoError, match="cannot read it as hdf5"):
        damo.load_d4rl_hdf5(str(tmp_path / "hopper_text-v2.hdf5"), "hopper-medium")


def rendering_works() -> bool:
    code = ("import gymnasium as gym; e = gym.make('Hopper-v5', render_mode='rgb_array'); e.reset(seed=0); "
            "assert e.render().ndim == 3")
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120).returncode == 0


@pytest.mark.slow
def test_eval_only_capture_video(minari_root, e2e_run, tmp_path):
    run = copy_run(e2e_run, tmp_path / "video")
    p = run_cli(["--eval-only", str(run), "--eval-episodes", "2", "--seed", "3", "--capture-video"], minari_root)
    if rendering_works():  # MuJoCo renders offscreen here (EGL or OSMesa): an MP4 of the first episode
        assert p.returncode == 0, p.stderr[-3000:]
        out = json.loads(p.stdout.strip().splitlines()[-1])
        video = Path(out["video"])
        assert video.parent == run / "videos" and video.suffix == ".mp4"
        assert video.stat().st_size > 1000 and video.read_bytes()[4:8] == b"ftyp"  # an MP4 container
        last = list(csv.DictReader(open(run / "eval.csv")))[-1]  # recording does not change the evaluation
        assert out["return_mean"] == pytest.approx(float(last["return_mean"]), rel=1e-4)
    else:  # it cannot: a clear reason, no traceback
        assert p.returncode == 2 and "Traceback" not in p.stderr and "cannot render offscreen" in p.stderr


# --------------------------------------------------------------------------------------------------
# --compile: the compiled update is the same math
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_losses_equal_plain():
    """Three DAMO updates with torch.compile'd losses give the plain path's losses and weights."""
    import torch._inductor.config as inductor_config

    old = inductor_config.fallback_random
    inductor_config.fallback_random = True  # compiled random ops draw eager's numbers, so both paths see the same noise
    try:
        args = damo.with_env_defaults(damo.Args(hidden=32, disc_hidden=32, dynamics_hidden=32, batch_size=64), "hopper")
        torch.manual_seed(0)
        plain = damo.make_agent(11, 3, args, "cpu")
        fast = damo.make_agent(11, 3, args, "cpu")
        for name in ("actor", "critic", "critic_target", "disc"):
            getattr(fast, name).load_state_dict(getattr(plain, name).state_dict())
        rows = 500
        D = {"obs": torch.randn(rows, 11), "act": torch.rand(rows, 3) * 2 - 1, "rew": torch.randn(rows),
             "next_obs": torch.randn(rows, 11), "done": (torch.rand(rows) < 0.05).float()}
        synthetic = damo.SyntheticBuffer(rows, 11, 3, "cpu")
        synthetic.add({k: v + 0.3 for k, v in D.items()})
        for step in range(3):
            damo.compile_losses(False)
            torch.manual_seed(100 + step)
            a = damo.damo_update(plain, D, synthetic, args)
            damo.compile_losses(True)
            assert damo.critic_loss._torchdynamo_orig_callable.__name__ == "critic_loss"  # really the compiled path
            torch.manual_seed(100 + step)
            b = damo.damo_update(fast, D, synthetic, args)
            for k in ("disc_loss", "critic_loss", "td_loss", "conservative_gap", "actor_loss", "temperature_loss"):
                assert float(b[k]) == pytest.approx(float(a[k]), rel=1e-4, abs=1e-5), (step, k)
        for name in ("actor", "critic", "disc"):
            for (k, v), w in zip(getattr(plain, name).state_dict().items(), getattr(fast, name).state_dict().values()):
                assert torch.allclose(v, w, rtol=1e-4, atol=1e-5), (name, k)
        assert torch.allclose(plain.log_alpha_ent, fast.log_alpha_ent)
    finally:
        damo.compile_losses(False)
        inductor_config.fallback_random = old


def test_minari_dataset_whose_shapes_do_not_match_its_env(minari_root):
    """A Minari dataset that declares Hopper-v5 but holds 12-dim observations: refused with both shapes."""
    import minari
    from minari.data_collector import EpisodeBuffer

    rng = np.random.default_rng(0)
    buf = EpisodeBuffer(id=0, seed=0, observations=rng.standard_normal((51, 12)),
                        actions=rng.uniform(-1, 1, (50, 3)).astype(np.float32), rewards=rng.standard_normal(50),
                        terminations=np.zeros(50, bool), truncations=np.r_[np.zeros(49, bool), True])
    minari.create_dataset_from_buffers(dataset_id="mujoco/hopper/wrongshape-v0", buffer=[buf], env="Hopper-v5",
                                       observation_space=gym.spaces.Box(-np.inf, np.inf, (12,), np.float64),
                                       action_space=gym.spaces.Box(-1, 1, (3,), np.float32))
    with pytest.raises(damo.DamoError, match=r"obs 12, act 3 do not match the env Hopper-v5 \(11, 3\)"):
        damo.load_dataset("mujoco/hopper/wrongshape-v0", download=False)


def test_resume_without_buffer_in_checkpoint_refills_it(minari_root, e2e_run, tmp_path):
    """--no-checkpoint-buffer: small checkpoints; a resume refills the synthetic buffer with fresh rollouts."""
    args = [*RESUMABLE, "--dynamics-path", str(e2e_run / "dynamics.pt"), "--runs-dir", str(tmp_path),
            "--run-name", "nobuf", "--no-checkpoint-buffer"]
    p = run_cli([*args[: args.index("--epochs") + 1], "2", *args[args.index("--epochs") + 2:]], minari_root)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "nobuf"
    assert torch.load(run / "checkpoint.pt", weights_only=False)["synthetic"] is None
    p = run_cli(["--resume", str(run), "--epochs", "3"], minari_root)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [int(r["global_step"]) for r in eval_rows(run)] == [100, 200, 300]
    assert all(math.isfinite(float(r["return_mean"])) for r in eval_rows(run))
    assert json.load(open(run / "results.json"))["resumed_at_steps"] == [200]


# --------------------------------------------------------------------------------------------------
# sweep.py: datasets x variants x seeds on a local Ray (2 CPUs), killed and continued
# --------------------------------------------------------------------------------------------------


SWEEP_FLAGS = [*flags(epochs=6, checkpoint_every=100, threads=None), "--no-download"]


def sweep_cmd(sweep_dir) -> list[str]:
    return [sys.executable, str(HERE / "sweep.py"), "--env-ids", "hopper-medium-expert", "--seeds", "0", "1",
            "--variants", "damo", "bc", "--sweep-dir", str(sweep_dir), "--num-cpus", "2", "--progress-every", "2",
            "--", *SWEEP_FLAGS]


@pytest.mark.xdist_group("ray")  # the sweep tests (Ray) run one after another on one worker
def test_sweep_survives_a_kill_and_plots(minari_root, tmp_path):
    """2 seeds x (DAMO, BC) with one shared ensemble. The sweep and its local Ray are killed (SIGKILL to the
    whole session, as a crashed machine) once a run has finished and a DAMO run has a checkpoint but no
    result; the same command then finishes without redoing finished work, the interrupted run continues
    from its checkpoint and equals an uninterrupted run, and plot.py's table and figure cover the sweep."""
    import signal

    sweep, env = tmp_path / "sweep", {**os.environ, "MINARI_DATASETS_PATH": str(minari_root), **OFFLINE_ENV,
                                      "PYTHONWARNINGS": "ignore", "RAY_USAGE_STATS_ENABLED": "0"}
    runs = sweep / "runs"
    p = subprocess.Popen(sweep_cmd(sweep), env=env, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    t0, killed_at = time.time(), None
    try:
        while time.time() - t0 < 300 and p.poll() is None:
            done = [r.name for r in runs.glob("*") if (r / "results.json").exists()] if runs.exists() else []
            half = [r.name for r in runs.glob("*damo*") if (r / "checkpoint.pt").exists() and not (r / "results.json").exists()]
            if done and half:
                os.killpg(p.pid, signal.SIGKILL)  # the driver, Ray's head processes ...
                subprocess.run(["pkill", "-9", "-s", str(p.pid)])  # ... and its workers (their own process groups)
                killed_at = ({r: (runs / r / "results.json").read_bytes() for r in done}, half)
                break
            time.sleep(0.2)
    finally:
        subprocess.run(["pkill", "-9", "-s", str(p.pid)])
    assert killed_at is not None, "the sweep ended before it could be killed midway (runs too short?)"
    finished_before, interrupted = killed_at
    q = subprocess.run(sweep_cmd(sweep), env=env, cwd=HERE, capture_output=True, text=True, timeout=600)
    assert q.returncode == 0, q.stderr[-3000:]
    assert sorted(r.name for r in runs.iterdir()) == sorted(f"hopper-medium-expert__{v}__{s}" for v in ("damo", "bc")
                                                            for s in (0, 1))
    for r, before in finished_before.items():  # not redone: the same result file, one command in its log
        assert (runs / r / "results.json").read_bytes() == before
        assert (sweep / "logs" / f"{r}.log").read_text().count("$ python damo.py") == 1
    assert (sweep / "logs" / "hopper-medium-expert.dynamics.log").read_text().count("$ python damo.py") == 1
    name = interrupted[0]
    res = json.load(open(runs / name / "results.json"))
    assert res["resumed_at_steps"] and res["global_steps"] == 600
    seed = name.rsplit("__", 1)[1]
    ref = run_cli([*SWEEP_FLAGS, "--env-id", "hopper-medium-expert", "--seed", seed, "--threads", "1",
                   "--runs-dir", str(tmp_path / "ref"), "--run-name", "ref",
                   "--dynamics-path", str(sweep / "dynamics" / "hopper-medium-expert" / "dynamics.pt")], minari_root)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert eval_rows(tmp_path / "ref" / "ref") == eval_rows(runs / name)
    png = (sweep / "curves.png").read_bytes()
    assert png[:4] == b"\x89PNG" and "| hopper-medium-expert | BC | 2 |" in q.stdout and "| hopper-medium-expert | DAMO" in q.stdout
    assert "done" in q.stderr and "skipped" in q.stderr  # the progress table
    # the local Ray is on loopback (sweep.py binds it there), not on this machine's interface address
    assert "nodes at 127.0.0.1\n" in q.stderr, q.stderr[:2000]


@pytest.mark.xdist_group("ray")
def test_sweep_bad_specs_fail_before_anything_starts(minari_root, tmp_path):
    sweep = str(tmp_path / "sweep")
    base = ["--env-ids", "hopper-medium-expert", "--seeds", "0", "--sweep-dir", sweep]
    cases = [
        (["--env-ids", "hopper-mediu", "--sweep-dir", sweep], ["unknown env id 'hopper-mediu'"]),
        ([*base, "--variants", "damo", "nope"], ["unknown variant 'nope'", "NAME=FLAGS"]),
        ([*base, "--variants", "x=--no-such-flag 3"], ["variant 'x'", "not valid damo.py flags"]),
        ([*base, "--", "--alpha", "-1"], ["--alpha -1.0 is out of range"]),
        ([*base, "--", "--seed", "3"], ["--seed", "set by the sweep"]),
        ([*base, "--variants", "big=--n-ensemble 9"], ["--n-ensemble", "share"]),
        ([*base, "--address", "127.0.0.1:9"], ["--address 127.0.0.1:9", "no Ray cluster answers"]),
        (["--env-ids", "walker2d-medium", "--sweep-dir", sweep, "--", "--no-download"], ["walker2d/medium", "not found"]),
        ([*base[:-1], str(tmp_path / "old"), "--", "--rollout-length", "3"], ["--rollout-length 5 (now 3)", "--sweep-dir"]),
        ([*base[:-1], str(tmp_path / "old"), "--", "--actor-lr-schedule", "cosine"],
         ["--actor-lr-schedule constant (now cosine)"]),
    ]
    import sweep as sweep_py

    # a sweep folder made with the default common flags by a damo.py that had no --actor-lr-schedule yet and
    # a flag since removed: today's defaults still match it (the new flag at its default, the old one ignored)
    (tmp_path / "old").mkdir()
    old = {k: v for k, v in sweep_py.common_record(damo.Args()).items() if k != "actor_lr_schedule"}
    (tmp_path / "old" / "sweep.json").write_text(json.dumps({"common_flags": {**old, "a_flag_since_removed": 1}}))
    sweep_py.check_same_sweep(str(tmp_path / "old"), damo.Args())
    t0 = time.time()
    for (argv, must), (code, err) in zip(cases, run_many("sweep.py", [a for a, _ in cases], minari_root)):
        error_line(code, err, *must)
    assert time.time() - t0 < 120 and not os.path.exists(sweep)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.xdist_group("ray")
def test_sweep_on_a_ray_cluster_survives_a_lost_node(minari_root, tmp_path, request):
    """The cluster path as README "Sweeps" gives it: a head (`ray start --head`) and a worker node (`ray start
    --address`), 1 CPU each, with token authentication, on this machine only; sweep.py --address runs a BC
    run and its twin (same flags and seed) on them. The worker node is killed (SIGKILL to all its processes,
    as a lost machine) while both runs are half done: the sweep still finishes both, the lost one continued
    from its checkpoint (Ray's retry, damo.py --resume) and equal to its uninterrupted twin, no row lost or
    repeated. A client without the token gets the fix in its error. The cluster is stopped at the end.
    Ray 2.60 replaces a loopback --node-ip-address by this machine's interface address, so the test runs in a
    network namespace of its own with loopback alone: both nodes are at 127.0.0.1 (asserted)."""
    import secrets
    import signal

    if in_own_network_namespace(request, minari_root):
        return

    port = free_port()
    env = {**os.environ, "MINARI_DATASETS_PATH": str(minari_root), **OFFLINE_ENV, "PYTHONWARNINGS": "ignore",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts", "start", "--num-cpus", "1", "--node-ip-address",
               "127.0.0.1", "--disable-usage-stats"]
    nodes = []  # each node in its own session: killing one kills only its processes
    temp = tempfile.mkdtemp(prefix="damo-ray-")  # Ray's session files (short: its socket paths have a limit)

    def start(*extra):
        p = subprocess.Popen([*ray_cli, *extra], env=env, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        nodes.append(p.pid)
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out[-2000:]

    sweep = tmp_path / "sweep"
    runs = sweep / "runs"
    cmd = [sys.executable, str(HERE / "sweep.py"), "--env-ids", "hopper-medium-expert", "--seeds", "0",
           "--variants", "bc", "twin=--bc", "--sweep-dir", str(sweep), "--address", f"127.0.0.1:{port}",
           "--progress-every", "2", "--no-plot", "--", *flags(epochs=8, checkpoint_every=100, threads=None),
           "--no-download"]
    try:
        start("--head", "--port", str(port), "--ray-client-server-port", str(free_port()),
              "--include-dashboard", "false", "--temp-dir", temp)
        start("--address", f"127.0.0.1:{port}")
        no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
        bad = subprocess.run([*cmd[:cmd.index("--")], "--", "--no-download"], env={**no_token, "HOME": str(tmp_path)},
                             cwd=HERE, capture_output=True, text=True, timeout=180)
        last = bad.stderr.strip().splitlines()[-1]  # (above it, Ray's own warnings about the missing token)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
        assert last.startswith("error: Ray did not start") and "RAY_AUTH_TOKEN" in last and "ray get-auth-token" in last
        assert not runs.exists()

        p = subprocess.Popen(cmd, env=env, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        t0, killed = time.time(), False
        while time.time() - t0 < 300 and p.poll() is None:
            half = [r for r in runs.glob("*") if (r / "checkpoint.pt").exists() and not (r / "results.json").exists()]
            if len(half) == 2:
                subprocess.run(["pkill", "-9", "-s", str(nodes[1])])  # the worker node and its runs
                killed = True
                break
            time.sleep(0.1)
        assert killed, "both runs did not reach a checkpoint together (runs too short?)"
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        assert "nodes at 127.0.0.1, 127.0.0.1\n" in err, err[:2000]  # head and worker, on loopback only
    finally:
        for sid in nodes:
            subprocess.run(["pkill", "-9", "-s", str(sid)])
        shutil.rmtree(temp, ignore_errors=True)
    assert sorted(r.name for r in runs.iterdir()) == ["hopper-medium-expert__bc__0", "hopper-medium-expert__twin__0"]
    res = {r.name: json.load(open(r / "results.json")) for r in runs.iterdir()}
    assert all(v["global_steps"] == 800 for v in res.values())
    resumed = [n for n, v in res.items() if v["resumed_at_steps"]]
    assert len(resumed) == 1, res  # the run on the lost node, continued on the head
    starts = {n: (sweep / "logs" / f"{n}.log").read_text().count("$ python damo.py") for n in res}
    assert starts[resumed[0]] == 2 and sum(starts.values()) == 3
    a, b = (eval_rows(runs / n) for n in sorted(res))
    assert a == b and [int(r["global_step"]) for r in a] == [100 * i for i in range(1, 9)]  # equal twins: nothing lost, nothing twice


def test_plot_help_lists_and_documents_every_command(tmp_path):
    """plot.py's commands are tyro subcommands: `plot.py --help` names every command; each command's --help is
    tyro's usage with its positional arguments and documents the command (exit 0, no run, no error); a
    command without its argument, or with a value of the wrong type, gets tyro's error and exit status 2."""
    top = run_plot(["--help"], tmp_path)
    assert top.returncode == 0, top.stderr
    assert "usage: plot.py [-h] {curves,aggregate,side-by-side,diagnose,behaviours,sensitivity,robustness,data}" in top.stdout, top.stdout
    for command, usage, words in (("diagnose", "RUN", "the return the critic estimates"), ("data", "ENV_ID GAMMA", "discounted return"),
                                  ("behaviours", "RUN POLICY.npz", "Eq. 7b"),
                                  ("sensitivity", "RUNS SETTING", "last-10 score against"),
                                  ("robustness", "RUNS", "Sensor noise at deployment"),
                                  ("aggregate", "RUNS", "interquartile mean (IQM)"),
                                  ("side-by-side", "RUNS", "Fig. 1 side by side")):
        res = run_plot([command, "--help"], tmp_path)
        first = res.stdout.splitlines()[0] if res.stdout else ""
        assert res.returncode == 0 and first.startswith(f"usage: plot.py {command} [-h]") and f" {usage}" in first, res
        assert words in " ".join(res.stdout.split()) and "error" not in res.stderr, (command, res)
        bare = run_plot([command], tmp_path)
        assert bare.returncode == 2 and "Traceback" not in bare.stderr and "Missing" in bare.stderr, (command, bare.stderr)
    curves = run_plot(["curves", "--help"], tmp_path)
    assert curves.returncode == 0 and "--metric" in curves.stdout and "usage: plot.py curves" in curves.stdout, curves
    wrong = run_plot(["curves", str(tmp_path), "--band", "ci99"], tmp_path)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr and "--band" in wrong.stderr, wrong.stderr


def test_snapshots_and_plot_behaviours(minari_root, e2e_run, tmp_path):
    """--snapshot-every keeps the networks at each multiple (the last one equal to the final checkpoint's);
    `plot.py behaviours` reads every snapshot, and its numbers are the ones recomputed here by hand from a
    snapshot, the data and the behaviour policies; a policy of another env is refused with exit 2."""
    import torch

    import plot

    snaps = sorted((e2e_run / "snapshots").iterdir())
    assert [p.name for p in snaps] == ["step_0000100.pt", "step_0000200.pt"]
    last, final = torch.load(snaps[-1], weights_only=False), torch.load(e2e_run / "checkpoint.pt", weights_only=False)
    assert last["synthetic"] is None and last["global_step"] == final["global_step"] == 200
    assert all(torch.equal(last["actor"][k], final["actor"][k]) for k in final["actor"])
    pol = [str(POLICIES / "hopper-medium.npz"), str(POLICIES / "hopper-expert.npz")]
    p = run_plot(["behaviours", str(e2e_run), *pol], minari_root)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.load(open(e2e_run / "behaviours.json"))
    assert [c["step"] for c in res["checkpoints"]] == [100, 200] and (e2e_run / "behaviours.png").stat().st_size > 10_000
    g = res["checkpoints"][0]["groups"]
    assert set(g) == {"mujoco/hopper/medium-v0 states", "mujoco/hopper/expert-v0 states", "first 50 steps"}
    for row in g.values():
        assert row["critic_prefers_hopper-medium"] + row["critic_prefers_hopper-expert"] == pytest.approx(1)
        assert 0 <= row["eq7b_keep"] <= 1 and row["actor_dist_to_hopper-medium"] > 0
    # by hand, on every expert state (the group holds all of them: no more than n = 4000)
    ag, ck = damo.load_agent(str(snaps[0]))
    data, info, _ = damo.load_dataset("hopper-medium-expert", download=False)
    n_med = info["n_transitions_per_dataset"][0]
    w = dict(np.load(POLICIES / "hopper-medium.npz"))
    o = data["observations"][n_med:].astype(np.float64)
    h = np.maximum(np.maximum(o @ w["W1"] + w["b1"], 0) @ w["W2"] + w["b2"], 0)
    beh = torch.as_tensor(np.tanh(h @ w["Wmu"] + w["bmu"])).float()
    with torch.no_grad():
        mu = ag.actor.act((torch.as_tensor(data["observations"][n_med:]) - ck["obs_mean"]) / ck["obs_std"])
    expert = g["mujoco/hopper/expert-v0 states"]
    assert expert["n"] == len(o) <= 4000  # every expert row (a permutation of them): the same mean
    assert expert["actor_dist_to_hopper-medium"] == pytest.approx(float(((mu - beh) ** 2).sum(-1).mean()), rel=1e-4)
    # the real episodes: damo.py's own evaluation of that snapshot (the run's seed 3, its first 3 episodes)
    rets = damo.evaluate(ag.actor, damo.make_eval_envs(gym.make("Hopper-v5"), 3), 3 + 10_000, ck["obs_mean"], ck["obs_std"], "cpu")
    assert res["checkpoints"][0]["real_return_mean"] == pytest.approx(float(rets.mean()), rel=1e-6)
    bad = run_plot(["behaviours", str(e2e_run), str(POLICIES / "halfcheetah-sac-60k.npz")], minari_root)
    assert bad.returncode == 2 and "17-d observations" in bad.stderr and "Traceback" not in bad.stderr


# --------------------------------------------------------------------------------------------------
# the paper's other experiments: limited coverage, noisy data, sensitivity
# --------------------------------------------------------------------------------------------------


def test_limited_coverage_keeps_a_seeded_subset_of_whole_episodes(minari_root, e2e_run, tmp_path):
    """--data-fraction / --data-episodes: whole episodes drawn with --data-seed (not the run's seed), and
    every part of a run sees only them: config.json, the normalisation, the ensemble, resume, BC."""
    data, info, _ = damo.load_dataset("hopper-medium-expert", download=False)
    n_ep = info["n_episodes"]
    sub, sinfo = damo.limit_coverage(data, info, damo.Args(data_fraction=0.5))
    kept = np.unique(sub["episode"])
    assert len(kept) == round(0.5 * n_ep) == sinfo["n_episodes"] and sinfo["coverage"]["of_episodes"] == n_ep
    assert all((sub["episode"] == e).sum() == (data["episode"] == e).sum() for e in kept)  # whole episodes
    assert sinfo["n_transitions"] == len(sub["rewards"]) < len(data["rewards"])
    same, _ = damo.limit_coverage(data, info, damo.Args(data_fraction=0.5, seed=9))
    other, _ = damo.limit_coverage(data, info, damo.Args(data_fraction=0.5, data_seed=1))
    assert np.array_equal(same["episode"], sub["episode"]) and not np.array_equal(other["episode"], sub["episode"])
    full, finfo = damo.limit_coverage(data, info, damo.Args())
    assert len(full["rewards"]) == len(data["rewards"]) and "coverage" not in finfo
    returns = [data["rewards"][data["episode"] == e].sum() for e in range(n_ep)]
    assert finfo["data_return_mean"] == pytest.approx(np.mean(returns), rel=1e-5)

    k = max(2, n_ep // 3)
    p = run_cli(["--env-id", "hopper-medium-expert", "--runs-dir", str(tmp_path), "--run-name", "part", "--no-download",
                 *TINY, "--data-episodes", str(k), "--data-seed", "4"], minari_root)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = json.load(open(tmp_path / "part" / "config.json"))
    part, pinfo = damo.limit_coverage(data, info, damo.Args(data_episodes=k, data_seed=4))
    assert cfg["data"]["n_episodes"] == k and cfg["data"]["n_transitions"] == len(part["rewards"])
    assert cfg["data"]["coverage"] == {"episodes": k, "of_episodes": n_ep, "data_seed": 4}
    ck = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)
    assert torch.allclose(ck["obs_mean"], torch.as_tensor(part["observations"].mean(0)), atol=1e-5)
    # an ensemble of all the data is refused for a subset run; a resume cannot change the subset
    cases = [["--env-id", "hopper-medium-expert", "--runs-dir", str(tmp_path), "--run-name", "x", "--no-download", *TINY,
              "--data-episodes", str(k), "--data-seed", "4", "--dynamics-path", str(e2e_run / "dynamics.pt")],
             ["--resume", str(tmp_path / "part"), "--data-seed", "5", "--epochs", "3"]]
    (c1, e1), (c2, e2) = run_many("damo.py", cases, minari_root)
    error_line(c1, e1, "--dynamics-path")
    error_line(c2, e2, "--data-seed")
    p = run_cli(["--resume", str(tmp_path / "part"), "--epochs", "3"], minari_root)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.load(open(tmp_path / "part" / "results.json"))["global_steps"] == 300
    p = run_cli(["--env-id", "mujoco/hopper/medium-v0", "--bc", "--runs-dir", str(tmp_path), "--run-name", "bcpart",
                 "--no-download", *TINY, "--data-fraction", "0.25"], minari_root)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.load(open(tmp_path / "bcpart" / "config.json"))["data"]["coverage"]["episodes"] == round(
        0.25 * damo.load_dataset("mujoco/hopper/medium-v0", download=False)[1]["n_episodes"])


def test_limited_coverage_bad_values_fail_before_the_run_folder(minari_root, tmp_path):
    base = ["--env-id", "hopper-medium-expert", "--runs-dir", str(tmp_path), "--no-download", *TINY]
    cases = [([*base, "--data-fraction", "0"], ["--data-fraction 0.0 is out of range", "(0, 1]"]),
             ([*base, "--data-fraction", "1.5"], ["--data-fraction 1.5 is out of range"]),
             ([*base, "--data-episodes", "0"], ["--data-episodes 0 is out of range"]),
             ([*base, "--data-episodes", "100000"], ["--data-episodes 100000", "only"]),
             ([*base, "--data-episodes", "1", "--dynamics-batch-size", "4000"], ["keeps 1 of", "too few", "keep more episodes"]),
             ([*base, "--data-episodes", "3", "--data-fraction", "0.5"], ["pass one of them"])]
    for (argv, must), (code, err) in zip(cases, run_many("damo.py", [a for a, _ in cases], minari_root)):
        error_line(code, err, *must)
    assert not any(tmp_path.iterdir())


def test_make_dataset_action_noise(tmp_path, monkeypatch):
    """--action-noise: the executed and recorded action is the behaviour's plus Gaussian noise, clipped to
    the bounds; the same seed without noise gives other actions; the scale is in the metadata."""
    import minari

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    build("mujoco/hopper/clean-v0", "hopper-medium.npz", 600, 0, deterministic=True)
    build("mujoco/hopper/noisy-v0", "hopper-medium.npz", 600, 0, deterministic=True, action_noise=0.5)
    clean, noisy = (minari.load_dataset(f"mujoco/hopper/{n}-v0") for n in ("clean", "noisy"))
    assert noisy.storage.metadata["action_noise"] == 0.5 and clean.storage.metadata["action_noise"] == 0.0
    ep_c, ep_n = next(clean.iterate_episodes()), next(noisy.iterate_episodes())
    a = np.asarray(ep_n.actions)
    assert a.min() >= -1 and a.max() <= 1 and np.isclose(np.abs(a), 1).mean() > 0.05  # clipped at the bounds
    # the first step starts from the same reset: the noisy action is the clean one plus noise of std ~0.5
    assert np.allclose(ep_c.observations[0], ep_n.observations[0]) and not np.allclose(ep_c.actions[0], a[0])
    env = gym.make("Hopper-v5")  # and it is what the env executed: replaying it reproduces the next state
    env.reset(seed=0)  # make_dataset: episode k of the first source resets with --seed + k
    obs, *_ = env.step(a[0])
    assert np.allclose(obs, ep_n.observations[1], atol=1e-6)
    pol = make_dataset.NumpyPolicy(make_dataset.load_policy_weights(str(POLICIES / "hopper-medium.npz"), env), True, None)
    dev = np.concatenate([a[t] - pol(np.asarray(ep_n.observations[t])) for t in range(len(a))])
    inside = np.abs(np.concatenate([pol(np.asarray(o)) for o in ep_n.observations[:-1]]) + dev) < 0.999
    assert 0.35 < dev[inside].std() < 0.65
    data, info, _ = damo.load_dataset("mujoco/hopper/noisy-v0", download=False)
    assert info["action_noise"] == [0.5]
    code, err = run_many("make_dataset.py", [["--dataset-id", "mujoco/hopper/bad-v0", "--action-noise", "-0.1"]],
                         tmp_path)[0]
    error_line(code, err, "--action-noise -0.1", ">= 0")


def test_sweep_grid_expands_variants_and_subset_ensembles(minari_root):
    """--grid FLAG=V1,V2: every variant at every value, named VARIANT_FLAGVALUE; a data subset gets an
    ensemble of its own (a full-data ensemble would see episodes the runs must not)."""
    import sweep

    sa = sweep.SweepArgs(env_ids=("hopper-medium-expert",), seeds=(0, 1), variants=("damo", "bc"),
                         grid=("data_fraction=1,0.3",), sweep_dir="unused")
    runs, ens, _ = sweep.plan(sa, ["--no-download"])
    assert sorted({r["name"].split("__")[1] for r in runs}) == ["bc_data_fraction0.3", "bc_data_fraction1",
                                                                 "damo_data_fraction0.3", "damo_data_fraction1"]
    assert sorted(ens) == ["hopper-medium-expert", "hopper-medium-expert__data_fraction0.3"]
    assert ens["hopper-medium-expert__data_fraction0.3"]["argv"][-5:] == ["--data-fraction", "0.3", "--env-id",
                                                                          "hopper-medium-expert", "--dynamics-only"]
    r = next(r for r in runs if r["name"] == "hopper-medium-expert__damo_data_fraction0.3__1")
    assert r["ensemble"] == "hopper-medium-expert__data_fraction0.3" and r["argv"][-6:-4] == ["--data-fraction", "0.3"]
    runs, ens, _ = sweep.plan(sweep.SweepArgs(env_ids=("hopper-medium-expert",), seeds=(0,), variants=("damo",),
                                              grid=("alpha=1,5", "tau=0.01,0.02"), sweep_dir="unused"), ["--no-download"])
    assert len(runs) == 4 and list(ens) == ["hopper-medium-expert"]
    assert "hopper-medium-expert__damo_alpha5_tau0.02__0" in {r["name"] for r in runs}
    for grid, must in [(("alpha",), "not FLAG=V1,V2"), (("seed=1,2",), "set by the sweep"),
                       (("alpha=-1",), "--alpha -1.0 is out of range"), (("n_ensemble=7,9",), "share")]:
        with pytest.raises(sweep.SweepError, match=re.escape(must)):
            sweep.plan(sweep.SweepArgs(env_ids=("hopper-medium-expert",), seeds=(0,), variants=("damo",), grid=grid,
                                       sweep_dir="unused"), ["--no-download"])


def test_plot_sensitivity_from_runs(minari_root, tmp_path):
    """plot.py sensitivity RUNS data_fraction: the last-10 of each run at its value, mean over seeds."""
    runs = tmp_path / "runs"
    argvs = [["--env-id", "mujoco/hopper/medium-v0", "--bc", "--runs-dir", str(runs), "--run-name", f"bc_{f}_{s}",
              "--no-download", *TINY, "--epochs", "3", "--seed", str(s), "--data-fraction", str(f)]
             for f in (1.0, 0.5) for s in (0, 1)]
    for code, err in run_many("damo.py", argvs, minari_root):
        assert code == 0, err[-2000:]
    (runs / "unfinished").mkdir()  # a run still going: left out, with a warning
    (runs / "unfinished" / "config.json").write_text((runs / "bc_0.5_0" / "config.json").read_text())
    (runs / "unfinished" / "eval.csv").write_text((runs / "bc_0.5_0" / "eval.csv").read_text())
    ens = runs / "dynamics" / "subset"  # a sweep's ensemble (--dynamics-only): no policy, skipped without a word
    ens.mkdir(parents=True)
    cfg = json.load(open(runs / "bc_0.5_0" / "config.json"))
    json.dump({**cfg, "args": {**cfg["args"], "bc": False, "dynamics_only": True}}, open(ens / "config.json", "w"))
    (ens / "eval.csv").write_text("global_step,normalized_score\n")
    p = run_plot(["sensitivity", str(runs), "data_fraction", "--out", str(tmp_path / "sens")], minari_root)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "unfinished has not finished" in p.stderr and "subset" not in p.stderr
    table = json.load(open(tmp_path / "sens.json"))
    last10 = lambda r: np.mean([float(x["normalized_score"]) for x in csv.DictReader(open(runs / r / "eval.csv"))][-10:])  # noqa: E731
    for f in (1.0, 0.5):
        row = next(t for t in table if t["data_fraction"] == f)
        assert row["seeds"] == 2 and row["mean"] == pytest.approx(np.mean([last10(f"bc_{f}_{s}") for s in (0, 1)]), abs=1e-4)
    assert f"| BC | 0.5 | 2 |" in p.stdout and (tmp_path / "sens.png").read_bytes()[:4] == b"\x89PNG"
    # a run made before --data-fraction existed has no such key in its config.json: it used all episodes (1)
    old = tmp_path / "old" / "bc_old_0"
    shutil.copytree(runs / "bc_1.0_0", old)
    cfg = json.load(open(old / "config.json"))
    del cfg["args"]["data_fraction"]
    json.dump(cfg, open(old / "config.json", "w"))
    p = run_plot(["sensitivity", str(old.parent), "data_fraction", "--out", str(tmp_path / "old_sens")], minari_root)
    assert p.returncode == 0, p.stderr[-2000:]
    assert [(t["data_fraction"], t["seeds"]) for t in json.load(open(tmp_path / "old_sens.json"))] == [(1.0, 1)]
    cases = [(["sensitivity", str(runs), "nope"], "unknown setting 'nope'"),
             (["sensitivity", str(tmp_path / "none"), "alpha"], "does not exist"),
             (["robustness", str(runs), "--noise", "0", "-1"], "noise levels must be >= 0")]
    *refused, (code, err) = run_many("plot.py", [argv for argv, _ in cases] + [["robustness", str(runs), "--noise", "a"]],
                                     minari_root)
    for (code_, err_), (_, must) in zip(refused, cases):
        error_line(code_, err_, must)
    assert code == 2 and "Traceback" not in err and "Error parsing --noise" in err, err  # tyro's own error: not a number
    # plot.py robustness: each final policy at each sensor-noise level, the numbers of damo.py --eval-only
    p = run_plot(["robustness", str(runs), "--noise", "0", "1", "--episodes", "2", "--out", str(tmp_path / "rob")], minari_root)
    assert p.returncode == 0, p.stderr[-2000:]
    table = json.load(open(tmp_path / "rob.json"))
    for x in (0.0, 1.0):
        alone = [json.loads(run_cli(["--eval-only", str(runs / f"bc_{f}_{s}"), "--eval-episodes", "2", "--seed", "0",
                                     "--obs-noise", str(x)], minari_root).stdout.strip().splitlines()[-1])["normalized_score"]
                 for s in (0, 1) for f in (1.0,)]
        row = next(t for t in table if t["obs_noise"] == x and t["variant"] == "BC")  # the full-data runs
        assert row["seeds"] == 2 and row["mean"] == pytest.approx(np.mean(alone), abs=1e-6)
    assert len(table) == 4 and table[0]["mean"] != table[1]["mean"]  # the noise changes what the policies do
    assert (tmp_path / "rob.png").read_bytes()[:4] == b"\x89PNG"
