"""DAMO: Dual Alignment Maximin Optimization for offline model-based RL, in one file.

Paper: Chi Zhou, Wang Luo, Haoran Li, Congying Han, Tiande Guo, Zicheng Zhang,
"Dual Alignment Maximin Optimization for Offline Model-based RL", arXiv 2502.00850.

What DAMO does [paper]. Offline model-based RL trains a policy on short rollouts of a learned dynamics
model M^ branched from an offline dataset D. DAMO asks that the learned policy, acting in M^, behave
like the behaviour policy acting in the real environment. It is an actor-critic maximin: the inner
minimisation over the critic is a "dual conservative value estimation" that aligns policies and
trajectories (a classifier aligns synthetic with offline data); the outer maximisation over the
policy keeps policy improvement consistent with the inner value estimates; the maximin objective
lower-bounds the standard RL objective, the mismatch being measured with an f-divergence.

What this file implements [ours]. The paper's full text, equations and code are not public; this is a
derivation consistent with everything the paper states. The equation numbers are this project's
(docs/derivation.md derives them; the code is tagged with them). With d^pi_M^ the occupancy of pi in
M^, d^D that of the data and d^S that of the synthetic buffer S:

    Eq. 1   J_alpha(pi) = E_{d^pi_M^}[ r ] - alpha * D_KL( d^pi_M^(s,a,s') || d^D(s,a,s') )  <=  J_M^(pi)
    Eq. 2   D_KL(d^pi_M^ || d^D) = D_KL(d^pi_M^ || d^S) + E_{d^pi_M^}[ log d^S / d^D ]

The second part of Eq. 2 is a reward penalty that a classifier D_w(s,a,s') estimates (Eqs. 3-4, data
alignment, "er"); the first motivates a conservative critic in COMBO's form, which pushes Q down on
the policy's actions and up on the data's (Eqs. 5-6, behaviour alignment, "ir"); the actor
ascends that critic (Eq. 7) and, for the policy part of the divergence, clones the data's actions that
the same critic ranks above the policy's own (Eq. 7b). The equations are the same on every dataset;
alpha, and on hopper the discount and the target rate, are the per-dataset settings (ENV_DEFAULTS).
[paper] marks what the paper states, [ours] this project's reconstruction or choice.

Usage:
    python damo.py --env-id hopper-medium-expert --seed 0
    python damo.py --help

Map of the file (top to bottom, in the order of the algorithm):
    1. Args        every flag, its symbol, equation and where its default comes from
    2. Data        D normalised on the device (prepare_data), normalised scores (Eq. 10), batches, the
                   buffer S
    3. Networks    EnsembleLinear, dynamics ensemble, termination functions, classifier, critics, actor
    4. Losses      dynamics_loss (Eq. 9), discriminator_loss (Eq. 3), corrected_reward (Eq. 4),
                   critic_loss (Eqs. 5-6), actor_loss (Eqs. 7, 7b), temperature_loss (Eq. 8)
    5. damo_update one gradient step: classifier -> r~ -> critics -> actor -> temperature -> targets
    6. train_dynamics, model_rollout, evaluate
    7. Algorithm 1 fit_dynamics -> train (the loop) -> main
    Appendix       plumbing, not part of DAMO: flag checks, the peers' settings (--penalty), the held-out
                   final score (the one to report), Minari and D4RL files -> flat arrays and a subset of
                   episodes (limited coverage), the run's history and folder (logs, eval.csv,
                   results.json), checkpoints and --resume, --eval-only, --benchmark
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import platform
import random
import re
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional
from urllib.parse import urlparse

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ====================================================================================================
# 1. Arguments
# ====================================================================================================


@dataclass
class Args:
    # --- what to run ---
    env_id: str = "hopper-medium-expert"
    """dataset: {hopper,halfcheetah,walker2d}-{simple,medium,expert,medium-expert,medium-replay} or a full Minari id"""
    seed: int = 0
    """seed of python, numpy and torch; evaluation episode k is reset with seed + 10_000 + k"""
    bc: bool = False
    """behaviour-cloning baseline: the actor's mean action fitted to the offline actions (no model, no critic)"""

    # --- data ---
    dataset_path: Optional[str] = None
    """a D4RL -v2 hdf5 file instead of a Minari dataset (evaluated in the Gymnasium v5 env; docs/data.md)"""
    download: bool = True
    """download a missing Minari dataset (needs network and minari[hf]); --no-download fails at once instead"""
    data_fraction: float = 1.0
    """limited coverage: train on this share of D's episodes, a random subset drawn with --data-seed (ours)"""
    data_episodes: Optional[int] = None
    """limited coverage: train on this many of D's episodes instead of a fraction (ours)"""
    data_seed: int = 0
    """seed of the episode subset: fixed across training seeds, so that seeds vary the learner, not the data"""

    # --- dynamics ensemble M^ (Eq. 9) ---
    dynamics_path: Optional[str] = None
    """reuse a trained ensemble (a run's dynamics.pt or checkpoint.pt, same dataset) instead of training one"""
    dynamics_only: bool = False
    """train the ensemble, write RUN/dynamics.pt (for --dynamics-path of later runs) and stop before the policy"""
    n_ensemble: int = 7
    """N, ensemble members (MOPO/MOBILE default)"""
    n_elites: int = 5
    """elite members used in rollouts, lowest holdout error (MOPO/MOBILE default)"""
    dynamics_hidden: int = 200
    """hidden width of each member, 4 Swish layers (MOPO/MOBILE default)"""
    dynamics_lr: float = 1e-3
    """Adam learning rate of the ensemble (MOPO/MOBILE default)"""
    dynamics_batch_size: int = 256
    """batch per member (MOPO/MOBILE default)"""
    dynamics_max_epochs: Optional[int] = None
    """cap on dynamics epochs (default: early stopping only, as MOPO)"""
    dynamics_patience: int = 5
    """stop after this many epochs without a > 1% holdout improvement of any member (MOPO/MOBILE default)"""
    dynamics_holdout: int = 1000
    """holdout transitions, at most 20% of the data (MOPO/MOBILE default)"""

    # --- model rollouts into the synthetic buffer S ---
    rollout_freq: int = 1000
    """gradient steps between model rollouts (MOPO/MOBILE default)"""
    rollout_batch_size: int = 50_000
    """start states per rollout, drawn from D (MOPO/MOBILE default)"""
    rollout_length: int = 5
    """h, rollout horizon (MOPO/MOBILE default for hopper and halfcheetah)"""
    model_retain_rollouts: int = 5
    """S keeps the transitions of this many rollouts, FIFO (MOPO/MOBILE default)"""
    real_ratio: float = 0.5
    """share of offline rows in a training batch B (COMBO's 0.5; ours, docs/evidence.md)"""

    # --- data alignment "er": classifier and corrected reward (Eqs. 3-4) ---
    beta: float = 0.1
    """beta, weight of the reward correction r~ = r + beta * clip(logit D) (Eq. 4; 0 = "w/o er"; ours, docs/evidence.md)"""
    logit_clip: float = 5.0
    """c, the classifier's logit is clipped to [-c, c] in Eq. 4 (ours)"""
    disc_hidden: int = 256
    """classifier MLP width, 2 hidden layers (ours)"""
    disc_lr: float = 3e-4
    """classifier Adam learning rate (ours)"""

    # --- behaviour alignment "ir": critics and actor (Eqs. 5-8) ---
    alpha: Optional[float] = None
    """alpha, weight of the conservative term (Eq. 5) and of Eq. 7b; 0 = "w/o ir"; default per dataset: hopper, walker2d 5, walker2d-medium-expert 1, halfcheetah 0.5 (ENV_DEFAULTS; ours, docs/evidence.md)"""
    bc_coef: float = 0.2
    """eta, the actor's behaviour term has weight alpha * eta (Eq. 7b; 0 = Eq. 7 alone; ours)"""
    bc_filter: bool = True
    """Eq. 7b clones only the data actions the critic ranks above the policy's own (CRR's binary filter; ours); off: every data action (TD3+BC)"""
    gamma: Optional[float] = None
    """discount; default per environment: 0.99 on halfcheetah and walker2d (MOPO/MOBILE), 0.995 on hopper (ENV_DEFAULTS; ours, docs/evidence.md)"""
    backup_entropy: bool = True
    """-alpha_ent * log pi(a'|s') in the TD target (Eq. 6, SAC's soft value); off: Q estimates the plain return"""
    tau: Optional[float] = None
    """Polyak rate of the target critics; default per environment: 0.005 on halfcheetah and walker2d (SAC), 0.02 on hopper (ENV_DEFAULTS; ours, docs/evidence.md)"""
    batch_size: int = 256
    """B, training batch (SAC default)"""
    actor_lr: float = 1e-4
    """actor Adam learning rate (MOBILE default)"""
    critic_lr: float = 3e-4
    """critic Adam learning rate (MOBILE default)"""
    alpha_ent_lr: float = 1e-3
    """learning rate of the entropy temperature alpha_ent (Eq. 8; ours, 10x MOBILE's: on halfcheetah the first score above 20 at 4-8k steps, not 9-13k; docs/evidence.md)"""
    n_critics: int = 2
    """critics in the ensemble; the target takes their minimum (SAC default)"""

    # --- the paper's peers on this pipeline: MOPO and MOBILE reward penalties (not DAMO) ---
    penalty: str = "none"
    """a peer's reward penalty on synthetic rows, in the critic's target: mopo (Yu et al. 2020), mobile (Sun et al. 2023) or none; with a penalty, DAMO's alignments are off and the dataset's published settings apply to every flag not given (PEER_SETTINGS, docs/peers.md)"""
    penalty_coef: Optional[float] = None
    """the penalty's coefficient, MOPO's lambda or MOBILE's beta (default: the dataset's published value)"""
    penalty_samples: int = 10
    """MOBILE: next states drawn from each elite to estimate the Bellman target's spread (MOBILE default)"""
    alpha_ent_fixed: Optional[float] = None
    """a fixed entropy temperature instead of Eq. 8's tuning (MOBILE's 0.2 on hopper-medium and -medium-replay)"""
    actor_lr_schedule: str = "constant"
    """the actor's learning rate over the run: constant (DAMO) or cosine, annealed to 0 over the epochs, one step per epoch (the peers' code; their default with --penalty)"""
    hidden: int = 256
    """width of the actor's and critics' two hidden layers (SAC default)"""

    # --- training length and evaluation ---
    epochs: int = 3000
    """E, epochs; an evaluation closes each epoch (MOPO/MOBILE: 3000 x 1000 = 3M steps)"""
    steps_per_epoch: int = 1000
    """gradient steps per epoch (MOPO/MOBILE default)"""
    eval_episodes: int = 10
    """deterministic evaluation episodes per evaluation, stepped together (D4RL convention)"""
    eval_every: int = 1
    """epochs between evaluations (1: every epoch, the protocol's curve and last-10; the last epoch is always evaluated)"""
    heldout_episodes: int = 100
    """episodes of the held-out final evaluation: the final policy from start states no training evaluation sees (start seeds 2^34 + 1000 * seed + k), the score to report and rank by (results.json "heldout"); 0 skips it"""

    # --- run, logging and infrastructure (not part of the method) ---
    exp_name: str = "damo"
    """name of this experiment (part of the run folder's name)"""
    runs_dir: str = "runs"
    """folder that holds one sub-folder per run"""
    run_name: Optional[str] = None
    """run folder name (default: {env_id}__{exp_name}__{seed}__{unix time})"""
    log_every: int = 1000
    """gradient steps between scalar logs; losses are checked for NaN/inf at these steps only"""
    track: bool = False
    """log to Weights & Biases as well (needs `pip install wandb` and a login)"""
    wandb_project_name: str = "damo"
    """W&B project (with --track)"""
    wandb_entity: Optional[str] = None
    """W&B entity (with --track)"""
    checkpoint_every: int = 10_000
    """gradient steps between full checkpoints (written atomically; one more at the end)"""
    snapshot_every: int = 0
    """gradient steps between snapshots RUN/snapshots/step_NNNNNNN.pt (the networks, no synthetic buffer), kept to look at a run's course (plot.py behaviours, --eval-only); 0: none"""
    checkpoint_buffer: bool = True
    """store the synthetic buffer in checkpoints (exact --resume); off: a resume refills it with fresh rollouts"""
    resume: Optional[str] = None
    """continue a killed or finished run from RUN/checkpoint.pt with its own settings (--epochs may grow)"""
    eval_only: Optional[str] = None
    """evaluate a run's checkpoint (folder or checkpoint.pt) for --eval-episodes episodes, print, exit; episode k starts from seed + 10000 + k with the run's own --seed (its training evaluations' start states), or with --seed when it is given"""
    heldout: bool = False
    """with --eval-only: play the held-out block instead (--heldout-episodes episodes) and record it in the run's results.json"""
    obs_noise: float = 0.0
    """with --eval-only: N(0, SIGMA^2) noise on every observation the policy sees, SIGMA in units of the data's per-dimension std (the environment itself is unchanged): robustness at deployment"""
    capture_video: bool = False
    """with --eval-only: MP4 of the first episode in videos/ beside the checkpoint (needs MUJOCO_GL=egl or osmesa)"""
    benchmark: bool = False
    """time every phase on random data of the env's shapes (no dataset needed), print a table and JSON, exit"""
    benchmark_repeats: int = 5
    """--benchmark: repeats per figure (the median is reported, after one warm-up)"""
    compile: bool = False
    """torch.compile the update's loss functions (off: slower on a 2-core CPU; docs/speed.md)"""
    cuda: bool = True
    """use CUDA when it is available"""
    torch_deterministic: bool = True
    """set torch.backends.cudnn.deterministic (CPU runs are reproducible for a fixed seed and thread count)"""
    threads: int = 1
    """CPU threads for torch (1: several 1-thread runs side by side use the cores best; docs/speed.md)"""


# Per-environment and per-dataset coefficients [ours]. alpha is the coefficient the paper itself tunes per
# dataset (its Fig. 5); COMBO's conservative weights differ the same way (5 on hopper, 0.5 on halfcheetah).
# gamma and tau set how far ahead the critic sees within the budget: on hopper the behaviours differ in when
# they fall, hundreds of steps ahead, which gamma 0.99 weighs at a few percent and a target at SAC's rate
# 0.005 carries back only slowly; gamma 0.995 with tau 0.02 keeps the gait that stays up (docs/evidence.md,
# "Hopper"). Every equation is the same on every dataset. A dataset's row overrides its environment's row
# field by field; the fields are None until the dataset is known; a value given on the command line or from
# Python is kept; config.json records the values a run used; another environment family gets hopper's.
ENV_DEFAULTS = {
    "hopper": {"alpha": 5.0, "gamma": 0.995, "tau": 0.02},
    "walker2d": {"alpha": 5.0, "gamma": 0.99, "tau": 0.005},
    "halfcheetah": {"alpha": 0.5, "gamma": 0.99, "tau": 0.005},
    "walker2d-medium-expert": {"alpha": 1.0},  # at 5 the critic stops rising and the policy keeps the weak gait
}


def with_env_defaults(args: Args, family: str, dataset: str = "") -> Args:
    """args with ENV_DEFAULTS' values (the family's row, else hopper's, updated by the dataset's own row)
    in every field that is still None (not given)."""
    table = {**ENV_DEFAULTS.get(family, ENV_DEFAULTS["hopper"]), **ENV_DEFAULTS.get(dataset, {})}
    return replace(args, **{f: v for f, v in table.items() if getattr(args, f) is None})


# ====================================================================================================
# 2. Data: the offline dataset D, normalised, on the device; normalised scores; batches; the buffer S
# ====================================================================================================
# Names: `arrays` is D as the loaders give it (numpy, raw observations, one row per transition); `D` is
# the same rows as tensors on the device with normalised observations (keys obs, act, rew, next_obs, done);
# `data` is a Data, D with what the loop needs beside it.


class DamoError(Exception):
    """A problem the user can fix; main() prints it without a traceback and exits with status 2."""


# D4RL's reference returns (random, expert). On Minari's v5 data these give an *approximation* of the
# paper's D4RL-v2 scale, because the environments and the data differ: always read raw returns too.
D4RL_REF = {"hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0), "walker2d": (1.629008, 4592.3)}


@dataclass
class Data:
    """The offline data D on the device (observations normalised) and what the loop needs beside it."""

    D: dict  # obs, act, rew, next_obs, done: [rows, ...] tensors; batches are index tensors into them
    info: dict  # dataset ids, reference scores, evaluation env id, ...
    obs_mean: torch.Tensor
    obs_std: torch.Tensor
    term_fn: Callable
    eval_envs: list  # one real env per evaluation episode

    @property
    def rows(self) -> int:
        return self.D["rew"].shape[0]


def prepare_data(args: Args, device) -> Data:
    """Algorithm 1, step 1: load D and normalise observations with D's mean and std. The same statistics
    map the model's predictions back to raw observations (termination) and the evaluation env's
    observations into the networks' coordinates, and are saved with every checkpoint."""
    arrays, info, env = load_offline(args)
    obs_mean = torch.as_tensor(arrays["observations"].mean(0), device=device)
    obs_std = torch.as_tensor(arrays["observations"].std(0), device=device).clamp_min(1e-3)  # constant dims
    D = {
        "obs": (torch.as_tensor(arrays["observations"], device=device) - obs_mean) / obs_std,
        "act": torch.as_tensor(arrays["actions"], device=device),
        "rew": torch.as_tensor(arrays["rewards"], device=device),
        "next_obs": (torch.as_tensor(arrays["next_observations"], device=device) - obs_mean) / obs_std,
        "done": torch.as_tensor(arrays["terminals"], device=device),  # terminations only (see load_dataset)
    }
    term_fn = termination_fn_for(info["env_family"], arrays) if not args.bc else never_terminates
    return Data(D, info, obs_mean, obs_std, term_fn, make_eval_envs(env, args.eval_episodes))


def normalized_score(ret, info: dict):
    """Eq. 10: score = 100 * (R - R_random) / (R_expert - R_random); NaN without references."""
    if info["ref_min_score"] is None:
        return float("nan") * np.asarray(ret)
    return 100.0 * (np.asarray(ret) - info["ref_min_score"]) / (info["ref_max_score"] - info["ref_min_score"])


def sample_rows(rows: dict, n: int, size: Optional[int] = None) -> dict:
    """n random rows (with replacement) of a dict of aligned tensors, drawn among the first `size` (default:
    all): one index tensor for all keys."""
    first = next(iter(rows.values()))
    idx = torch.randint(first.shape[0] if size is None else size, (n,), device=first.device)
    return {k: v[idx] for k, v in rows.items()}


class SyntheticBuffer:
    """FIFO ring buffer of synthetic transitions on the device (keeps the last few rollouts)."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device):
        self.capacity, self.size, self.ptr = capacity, 0, 0
        shapes = {"obs": (obs_dim,), "act": (act_dim,), "rew": (), "next_obs": (obs_dim,), "done": ()}
        self.data = {k: torch.zeros((capacity, *sh), device=device) for k, sh in shapes.items()}

    def add(self, batch: dict):
        n = min(batch["rew"].shape[0], self.capacity)
        idx = (self.ptr + torch.arange(n, device=batch["rew"].device)) % self.capacity
        for k, v in batch.items():
            self.data[k][idx] = v[-n:]
        self.ptr, self.size = (self.ptr + n) % self.capacity, min(self.size + n, self.capacity)

    def sample(self, n: int) -> dict:
        return sample_rows(self.data, n, self.size)


# ====================================================================================================
# 3. Networks
# ====================================================================================================


class EnsembleLinear(nn.Module):
    """E independent linear layers as one batched matmul: x [E, B, in] -> [E, B, out].
    One `baddbmm` instead of a Python loop over members (the speed of the whole ensemble)."""

    def __init__(self, n: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(n, 1, d_out))
        bound = 1 / math.sqrt(d_in)  # nn.Linear's default init, U(-1/sqrt(in), 1/sqrt(in))
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, members: Optional[torch.Tensor] = None) -> torch.Tensor:
        w, b = (self.weight, self.bias) if members is None else (self.weight[members], self.bias[members])
        return torch.baddbmm(b, x, w)


class DynamicsEnsemble(nn.Module):
    """Probabilistic ensemble M^(s' - s, r | s, a): each member outputs a diagonal Gaussian
    (mean, log-variance) over [delta normalised obs, reward] (MOPO/MOBILE architecture: 4x200 Swish,
    log-variance soft-clamped between learnable bounds)."""

    def __init__(self, obs_dim: int, act_dim: int, n: int, hidden: int, n_elites: int):
        super().__init__()
        self.n, self.out_dim = n, obs_dim + 1
        dims = [obs_dim + act_dim, hidden, hidden, hidden, hidden]
        self.layers = nn.ModuleList(EnsembleLinear(n, i, o) for i, o in zip(dims[:-1], dims[1:]))
        self.head = EnsembleLinear(n, hidden, 2 * self.out_dim)
        self.max_logvar = nn.Parameter(torch.full((1, 1, self.out_dim), 0.5))
        self.min_logvar = nn.Parameter(torch.full((1, 1, self.out_dim), -10.0))
        self.weight_decay = [2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4]  # per layer (MOPO/MOBILE default)
        self.register_buffer("elites", torch.arange(n_elites))  # set by train_dynamics

    def forward(self, x: torch.Tensor, members: Optional[torch.Tensor] = None):
        for layer in self.layers:
            x = F.silu(layer(x, members))  # Swish
        mean, logvar = self.head(x, members).chunk(2, dim=-1)
        # soft clamp into [min_logvar, max_logvar] keeps gradients alive at the bounds
        logvar = self.max_logvar - F.softplus(self.max_logvar - logvar)
        logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        return mean, logvar  # [E, B, obs_dim + 1] each


def hopper_termination(obs: torch.Tensor) -> torch.Tensor:
    """Hopper-v5: unhealthy when z <= 0.7, |angle| >= 0.2, or obs[1:] leaves (-100, 100). (The env checks
    unclipped velocities; observed velocities are clipped to +-10, so that part never fires from obs.)"""
    z, angle = obs[..., 0], obs[..., 1]
    healthy = (z > 0.7) & (angle.abs() < 0.2) & (obs[..., 1:].abs() < 100).all(-1)
    return ~healthy


def walker2d_termination(obs: torch.Tensor) -> torch.Tensor:
    """Walker2d-v5: unhealthy when z leaves (0.8, 2.0) or the angle leaves (-1, 1)."""
    z, angle = obs[..., 0], obs[..., 1]
    return ~((z > 0.8) & (z < 2.0) & (angle > -1.0) & (angle < 1.0))


def never_terminates(obs: torch.Tensor) -> torch.Tensor:
    """HalfCheetah-v5 (and any env whose episodes only end by time limit)."""
    return torch.zeros(obs.shape[:-1], dtype=torch.bool, device=obs.device)


TERMINATION_FNS = {"hopper": hopper_termination, "walker2d": walker2d_termination, "halfcheetah": never_terminates}


def termination_fn_for(family: str, data: dict) -> Callable:
    if family in TERMINATION_FNS:
        return TERMINATION_FNS[family]
    if data["terminals"].sum() == 0:  # the data never terminate: a time-limit-only env
        return never_terminates
    raise DamoError(f"no termination function is known for this dataset's env and its data do terminate; "
                    f"add one to TERMINATION_FNS (known: {', '.join(TERMINATION_FNS)})")


def mlp(d_in: int, d_out: int, hidden: int, n_hidden: int = 2) -> nn.Sequential:
    layers, d = [], d_in
    for _ in range(n_hidden):
        layers += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    return nn.Sequential(*layers, nn.Linear(d, d_out))


class Discriminator(nn.Module):
    """D_w(s, a, s') -> logit of "offline" (label 1) vs "synthetic" (label 0) (Eq. 3) [paper: a classifier
    aligns synthetic with offline data; its inputs and form are ours]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(2 * obs_dim + act_dim, 1, hidden)

    def forward(self, s, a, s_next):
        return self.net(torch.cat([s, a, s_next - s], -1)).squeeze(-1)  # [B] logits


class CriticEnsemble(nn.Module):
    """n critics Q_j(s, a) in one batched network (two 256 ReLU layers each): [B] -> [n, B]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, n: int):
        super().__init__()
        self.n = n
        self.l1 = EnsembleLinear(n, obs_dim + act_dim, hidden)
        self.l2 = EnsembleLinear(n, hidden, hidden)
        self.l3 = EnsembleLinear(n, hidden, 1)

    def forward(self, s, a):
        x = torch.cat([s, a], -1).expand(self.n, -1, -1)  # [n, B, obs_dim + act_dim], no copy
        return self.l3(F.relu(self.l2(F.relu(self.l1(x))))).squeeze(-1)  # [n, B]


class Actor(nn.Module):
    """Tanh-Gaussian policy pi(a|s), log-std clamped to [-5, 2] (SAC convention)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.trunk = mlp(obs_dim, 2 * act_dim, hidden)

    def forward(self, s):
        mu, log_std = self.trunk(s).chunk(2, -1)
        return mu, log_std.clamp(-5.0, 2.0)

    def sample(self, s):
        """a ~ pi(.|s) by reparameterisation, with log pi(a|s) (tanh change of variables)."""
        mu, log_std = self(s)
        u = mu + log_std.exp() * torch.randn_like(mu)
        a = torch.tanh(u)
        log_prob = (-0.5 * ((u - mu) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)  # log|d tanh(u)/du|
        return a, log_prob

    def act(self, s):
        """The deterministic action tanh(mu), used for evaluation."""
        return torch.tanh(self(s)[0])


# ====================================================================================================
# 4. Losses, one function each, returning (loss, info)
# ====================================================================================================


def dynamics_loss(model: DynamicsEnsemble, x: torch.Tensor, y: torch.Tensor):
    """Eq. 9: Gaussian NLL per member, summed over members, + per-layer weight decay
    + 0.01 * (sum max_logvar - sum min_logvar) (MOPO/MOBILE). x [E, B, in], y [E, B, obs_dim + 1]."""
    mean, logvar = model(x)
    nll = (((mean - y) ** 2) * torch.exp(-logvar) + logvar).mean(dim=(1, 2)).sum()
    decay = sum(wd * 0.5 * (layer.weight ** 2).sum() for wd, layer in zip(model.weight_decay, [*model.layers, model.head]))
    bounds = 0.01 * (model.max_logvar.sum() - model.min_logvar.sum())
    return nll + decay + bounds, {"dynamics_nll": nll.detach()}


def discriminator_loss(disc: Discriminator, off: tuple, syn: tuple):
    """Eq. 3: binary cross-entropy, offline transitions labelled 1, synthetic ones 0. At the optimum
    D / (1 - D) = d^D / d^S, so logit D = log d^D/d^S, which Eq. 4 uses as a reward correction [ours]."""
    logit_off, logit_syn = disc(*off), disc(*syn)
    loss = F.binary_cross_entropy_with_logits(logit_off, torch.ones_like(logit_off)) + \
        F.binary_cross_entropy_with_logits(logit_syn, torch.zeros_like(logit_syn))
    acc = 0.5 * ((logit_off > 0).float().mean() + (logit_syn < 0).float().mean())
    return loss, {"disc_loss": loss, "disc_acc": acc, "disc_p_offline": torch.sigmoid(logit_off).mean(),
                  "disc_p_synthetic": torch.sigmoid(logit_syn).mean()}


def corrected_reward(disc: Discriminator, s, a, r, s_next, is_synthetic, beta: float, clip: float):
    """Eq. 4 (data alignment, "er") [ours]: r~ = r + beta * clip(logit D(s, a, s'), -c, c) on synthetic rows;
    offline rows keep their reward. Synthetic transitions unlike the offline data get less reward."""
    if beta == 0:
        return r, torch.zeros_like(r)
    with torch.no_grad():
        bonus = beta * disc(s, a, s_next).clamp(-clip, clip) * is_synthetic
    return r + bonus, bonus


def mopo_penalty(model: DynamicsEnsemble, s, a, obs_std) -> torch.Tensor:
    """MOPO's uncertainty u(s, a) (Yu et al. 2020; OfflineRL-Kit's "aleatoric" mode) [peer, not DAMO]: the largest,
    over all members, of the L2 norm of the predicted std of (s', r), in raw units (x obs_std), as its
    published coefficients assume. [B]"""
    _, logvar = model(torch.cat([s, a], -1).expand(model.n, -1, -1))  # [E, B, obs + 1]
    scale = torch.cat([obs_std, obs_std.new_ones(1)])
    return ((0.5 * logvar).exp() * scale).norm(dim=-1).max(0).values


def mobile_penalty(model: DynamicsEnsemble, critic_target, actor, s, a, n_samples: int, chunk: int = 1024):
    """MOBILE's uncertainty u(s, a), the model-Bellman inconsistency (Sun et al., ICML 2023) [peer, not DAMO]:
    each elite draws n_samples s'; u = the std across elites of the mean over its draws of min_k Qbar_k(s', pi(s')). [B]"""
    n_el, B = len(model.elites), len(s)
    mean, logvar = model(torch.cat([s, a], -1).expand(n_el, -1, -1), members=model.elites)  # [n_el, B, obs + 1]
    eps = torch.randn(n_samples, *mean.shape, device=s.device)
    s2 = s + (mean + eps * (0.5 * logvar).exp())[..., :-1]  # [n_samples, n_el, B, obs]
    # 10 x 5 x 243 = 12,150 next states a step at the defaults: on a CPU, in chunks whose activations stay in cache
    parts = s2.reshape(-1, s.shape[1]).split(chunk if s.device.type == "cpu" else n_samples * n_el * B)
    q = torch.cat([critic_target(x, actor.sample(x)[0]).min(0).values for x in parts]).view(n_samples, n_el, B)
    return q.mean(0).std(0)


def critic_loss(critic, critic_target, actor, log_alpha_ent, batch: dict, n_real: int, offline: Optional[dict],
                alpha: float, gamma: float, backup_entropy: bool = True, penalty: Optional[Callable] = None,
                target_min: Optional[float] = None):
    """Eqs. 5-6 (inner min over Q, behaviour alignment "ir") [ours: COMBO/CQL's regulariser with rho = B,
    motivated by a dual of the divergence (docs/derivation.md says how it differs from that dual); our
    reading of the paper's "dual conservative value estimation"], for every critic j:

      L(Q_j) = alpha * ( E_{s~B, a~pi(s)} Q_j(s, a) - E_{(s,a)~D} Q_j(s, a) )      (push down / push up)
             + 1/2 * E_{(s,a,r~,s')~B} ( y - Q_j(s, a) )^2,                         (TD, Eq. 6)
      y = r~ + gamma * (1 - done) * ( min_k Qbar_k(s', a') - alpha_ent * log pi(a'|s') ),  a' ~ pi(s'),

    the entropy part only with backup_entropy (SAC's soft value; without it Q estimates the return of
    Eq. 1's objective itself, as CQL's `backup_entropy=False`). A peer's penalty (mopo_penalty,
    mobile_penalty: `penalty(s, a)` -> coefficient * u) is subtracted from the synthetic rows' reward here,
    and MOBILE clamps its target at target_min = 0.

    The push-up expectation is over offline rows: the first n_real rows of B, or `offline` when given
    (a separate offline batch, used when B holds few offline rows). Two other forms of the push-down
    (on the next states' actions; a soft maximum over sampled actions, CQL(H)) were measured and
    changed nothing (docs/evidence.md, with the patch that restores them)."""
    s, a, r, s2, d = batch["obs"], batch["act"], batch["rew"], batch["next_obs"], batch["done"]
    alpha_ent = log_alpha_ent.exp().detach()
    with torch.no_grad():
        # a peer's (MOPO, MOBILE) coefficient * u(s, a), on the synthetic rows only; none for DAMO
        pen = penalty(s[n_real:], a[n_real:]) if penalty else torch.zeros_like(r[n_real:])
        r = torch.cat([r[:n_real], r[n_real:] - pen])
        a2, logp2 = actor.sample(s2)
        v2 = critic_target(s2, a2).min(0).values - (alpha_ent * logp2 if backup_entropy else 0.0)
        y = r + gamma * (1.0 - d) * v2  # Eq. 6, [B]
        y = y if target_min is None else y.clamp_min(target_min)
        a_pi = actor.sample(s)[0] if alpha > 0 else None
    if alpha > 0:
        if offline is None:
            q_all = critic(torch.cat([s, s]), torch.cat([a, a_pi]))  # one forward: [n, 2B]
            q, q_pi = q_all[:, : len(s)], q_all[:, len(s):]
            q_data = q[:, :n_real]
        else:
            q_all = critic(torch.cat([s, s, offline["obs"]]), torch.cat([a, a_pi, offline["act"]]))
            q, q_pi, q_data = q_all[:, : len(s)], q_all[:, len(s): 2 * len(s)], q_all[:, 2 * len(s):]
        conservative = (q_pi.mean(1) - q_data.mean(1)).sum()  # Eq. 5, summed over critics
    else:
        q = critic(s, a)
        conservative = torch.zeros((), device=s.device)
    td = 0.5 * ((y - q) ** 2).mean(1).sum()
    loss = alpha * conservative + td
    # diagnostics: Q on B's offline rows (the data's own actions) and on its synthetic rows, apart
    info = {"critic_loss": loss, "td_loss": td, "conservative_gap": conservative / critic.n,
            "q_data": q[:, :n_real].mean(), "target_q": y.mean()}
    if n_real < len(s):
        info.update(q_synthetic=q[:, n_real:].mean(), penalty_synthetic=pen.mean())
    return loss, info


def actor_loss(critic, actor, log_alpha_ent, s: torch.Tensor, s_data: torch.Tensor, a_data: torch.Tensor,
               alpha: float, bc_coef: float, bc_filter: bool):
    """Eq. 7 (outer max over pi) [ours]: the soft actor loss on the inner critic,
        L_pi = E_{s~B} [ alpha_ent * log pi(a|s) - min_j Q_j(s, a) ],  a ~ pi(s),
    so the policy ascends exactly the value the critic estimates. Eq. 7b [ours]: the policy part of
    the behaviour divergence, E_s KL(pi(.|s) || pi_beta(.|s)). Its outer max has the solution
    pi* = pi_beta * w / Z with w = exp(A / (alpha * eta)), A = Q(s, a) - Q(s, pi(s)), Z(s) = E_beta[w]; it
    is projected onto the actor with CRR's binary weight w = 1[A > 0], the TD3+BC surrogate of log pi
    and, for Z, one constant per batch (the share of kept rows; self-normalised weights), not a Z(s) per
    state, which one action per state in D cannot estimate:
        alpha * eta * E_D[ w * ||mu(s) - a||^2 ] / E_D[ w ],  w = 1[Q(s,a) > Q(s, mu(s))],  mu = tanh mean,
    so the actor clones the data's better actions, never the worse ones (on mixed data the mean of all
    actions can fail where each behaviour succeeds), with the strength of cloning them all. The Q
    term is divided by mean |Q| (TD3+BC) so that eta does not depend on the reward scale.
    alpha = 0 removes Eq. 7b with Eq. 5."""
    a, logp = actor.sample(s)
    q = critic(s, a).min(0).values
    sac = log_alpha_ent.exp().detach() * logp - q
    w_bc = alpha * bc_coef
    if w_bc > 0:
        mu = actor.act(s_data)
        err = ((mu - a_data) ** 2).sum(-1)
        if bc_filter:  # the critic's ranking only selects rows: no gradient flows through it
            with torch.no_grad():
                keep = (critic(s_data, a_data).min(0).values > critic(s_data, mu).min(0).values).float()
        else:
            keep = torch.ones_like(err)
        bc = (keep * err).sum() / keep.sum().clamp_min(1.0)
        loss = sac.mean() / q.abs().mean().detach().clamp_min(1e-6) + w_bc * bc
    else:
        bc, keep = torch.zeros((), device=s.device), torch.zeros(1, device=s.device)
        loss = sac.mean()
    info = {"actor_loss": loss, "actor_bc_mse": bc, "actor_bc_kept": keep.mean(), "entropy": -logp.mean()}
    return loss, info, logp.detach()


def temperature_loss(log_alpha_ent, logp: torch.Tensor, target_entropy: float):
    """Eq. 8: automatic entropy tuning, L = -log alpha_ent * (log pi + target_entropy), target -|A| (SAC)."""
    loss = -(log_alpha_ent * (logp + target_entropy)).mean()
    return loss, {"temperature_loss": loss, "alpha_ent": log_alpha_ent.exp()}


def bc_loss(actor, s, a):
    """Behaviour cloning baseline (--bc): ||tanh(mu(s)) - a||^2 on offline rows."""
    loss = ((actor.act(s) - a) ** 2).sum(-1).mean()
    return loss, {"bc_loss": loss}


# ====================================================================================================
# 5. One gradient step of DAMO, in the order of the algorithm (Eqs. 3-8)
# ====================================================================================================


@dataclass
class Agent:
    """The networks, their optimisers and the entropy temperature (nothing hidden: plain fields)."""

    actor: Actor
    actor_opt: torch.optim.Optimizer
    dynamics: Optional[DynamicsEnsemble] = None
    disc: Optional[Discriminator] = None
    disc_opt: Optional[torch.optim.Optimizer] = None
    critic: Optional[CriticEnsemble] = None
    critic_target: Optional[CriticEnsemble] = None
    critic_opt: Optional[torch.optim.Optimizer] = None
    log_alpha_ent: Optional[torch.Tensor] = None
    alpha_ent_opt: Optional[torch.optim.Optimizer] = None
    target_entropy: float = 0.0
    obs_std: Optional[torch.Tensor] = None  # D's observation std (MOPO's penalty is in raw units)


def make_agent(obs_dim: int, act_dim: int, args: Args, device) -> Agent:
    actor = Actor(obs_dim, act_dim, args.hidden).to(device)
    ag = Agent(actor, torch.optim.Adam(actor.parameters(), lr=args.actor_lr))
    if args.bc:
        return ag
    ag.dynamics = DynamicsEnsemble(obs_dim, act_dim, args.n_ensemble, args.dynamics_hidden, args.n_elites).to(device)
    ag.disc = Discriminator(obs_dim, act_dim, args.disc_hidden).to(device)
    ag.disc_opt = torch.optim.Adam(ag.disc.parameters(), lr=args.disc_lr)
    ag.critic = CriticEnsemble(obs_dim, act_dim, args.hidden, args.n_critics).to(device)
    ag.critic_target = copy.deepcopy(ag.critic).requires_grad_(False)
    ag.critic_opt = torch.optim.Adam(ag.critic.parameters(), lr=args.critic_lr)
    ag.log_alpha_ent = torch.tensor(math.log(args.alpha_ent_fixed or 1.0), device=device, requires_grad=True)
    ag.alpha_ent_opt = torch.optim.Adam([ag.log_alpha_ent], lr=args.alpha_ent_lr)
    ag.target_entropy = -float(act_dim)  # -|A| (SAC)
    return ag


def sgd_step(opt: torch.optim.Optimizer, loss: torch.Tensor):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def damo_update(ag: Agent, D: dict, synthetic: "SyntheticBuffer", args: Args) -> dict:
    """One gradient step: discriminator (Eq. 3) -> batch with r~ (Eq. 4) -> critics (Eqs. 5-6) -> actor
    (Eq. 7/7b) -> temperature (Eq. 8) -> target critics. Returns tensors for logging (no host sync)."""
    device = D["rew"].device
    n_real = max(1, int(round(args.batch_size * args.real_ratio)))
    n_syn = args.batch_size - n_real
    info_d = {}
    if args.beta > 0:  # balanced batch: offline (label 1) vs synthetic (label 0)
        d_off, d_syn = sample_rows(D, args.batch_size // 2), synthetic.sample(args.batch_size // 2)
        loss_d, info_d = discriminator_loss(ag.disc, (d_off["obs"], d_off["act"], d_off["next_obs"]),
                                            (d_syn["obs"], d_syn["act"], d_syn["next_obs"]))  # Eq. 3
        sgd_step(ag.disc_opt, loss_d)
    # B = n_real offline rows, then n_syn synthetic rows
    off, syn = sample_rows(D, n_real), synthetic.sample(n_syn)
    batch = {k: torch.cat([off[k], syn[k]]) for k in off}
    is_syn = (torch.arange(args.batch_size, device=device) >= n_real).float()
    batch["rew"], bonus = corrected_reward(ag.disc, batch["obs"], batch["act"], batch["rew"], batch["next_obs"],
                                           is_syn, args.beta, args.logit_clip)  # Eq. 4
    # few offline rows in B (small real_ratio): the push-up term and Eq. 7b get an offline batch of their own
    offline = sample_rows(D, args.batch_size) if n_real < args.batch_size // 2 and args.alpha > 0 else None
    loss_q, info_q = critic_loss(ag.critic, ag.critic_target, ag.actor, ag.log_alpha_ent, batch, n_real, offline,
                                 args.alpha, args.gamma, args.backup_entropy, peer_penalty(ag, args),
                                 0.0 if args.penalty == "mobile" else None)  # Eqs. 5-6 (with a peer's penalty)
    sgd_step(ag.critic_opt, loss_q)
    s_bc = offline if offline is not None else off
    ag.critic.requires_grad_(False)  # the actor's backward needs dQ/da only, not the critics' weight gradients
    loss_pi, info_pi, logp = actor_loss(ag.critic, ag.actor, ag.log_alpha_ent, batch["obs"], s_bc["obs"], s_bc["act"],
                                        args.alpha, args.bc_coef, args.bc_filter)  # Eqs. 7, 7b
    sgd_step(ag.actor_opt, loss_pi)
    ag.critic.requires_grad_(True)
    loss_a, info_a = temperature_loss(ag.log_alpha_ent, logp, ag.target_entropy)  # Eq. 8
    if args.alpha_ent_fixed is None:
        sgd_step(ag.alpha_ent_opt, loss_a)
    with torch.no_grad():  # Polyak averaging of the target critics, in place, one fused call
        torch._foreach_lerp_(list(ag.critic_target.parameters()), list(ag.critic.parameters()), args.tau)
    info = {**info_d, **info_q, **info_pi, **info_a, "reward_bonus_synthetic": (bonus * is_syn).sum() / max(n_syn, 1)}
    return {k: v.detach() for k, v in info.items()}


def bc_update(ag: Agent, D: dict, args: Args) -> dict:
    off = sample_rows(D, args.batch_size)
    loss, info = bc_loss(ag.actor, off["obs"], off["act"])
    sgd_step(ag.actor_opt, loss)
    return info


# ====================================================================================================
# 6. Dynamics training (Eq. 9), model rollouts, evaluation
# ====================================================================================================


def train_dynamics(model: DynamicsEnsemble, X: torch.Tensor, Y: torch.Tensor, args: Args, gen: torch.Generator,
                   progress=None) -> dict:
    """Fit the ensemble (Eq. 9) with a holdout split, snapshots on > 1% holdout improvement, early
    stopping and elite selection (MOPO/MOBILE procedure). X [N, obs+act], Y [N, obs+1]."""
    E, rows, dev = model.n, X.shape[0], X.device
    n_hold = min(int(0.2 * rows), args.dynamics_holdout)
    perm = torch.randperm(rows, generator=gen, device="cpu").to(dev)
    Xh, Yh, Xt, Yt = X[perm[:n_hold]], Y[perm[:n_hold]], X[perm[n_hold:]], Y[perm[n_hold:]]
    opt = torch.optim.Adam(model.parameters(), lr=args.dynamics_lr)
    n_train, bs = Xt.shape[0], args.dynamics_batch_size

    @torch.no_grad()
    def holdout_mse():
        mean, _ = model(Xh.expand(E, -1, -1))
        return ((mean - Yh) ** 2).mean(dim=(1, 2))  # [E]

    best = holdout_mse()
    snapshot = copy.deepcopy(model.state_dict())
    epoch, stale, steps = 0, 0, 0
    while True:
        # each member walks its own permutation of the training set (independent minibatches)
        idx = torch.argsort(torch.rand(E, n_train, generator=gen), dim=1).to(dev)
        for i in range(0, n_train, bs):
            j = idx[:, i: i + bs]  # [E, b]
            loss, info = dynamics_loss(model, Xt[j], Yt[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        epoch += 1
        mse = holdout_mse()
        improved = (best - mse) / best > 0.01  # [E]
        if improved.any():
            state = model.state_dict()
            for k, v in state.items():  # copy the improved members' weights into the snapshot
                if v.dim() == 3 and v.shape[0] == E:
                    snapshot[k][improved] = v[improved].clone()
            best = torch.where(improved, mse, best)
            stale = 0
        else:
            stale += 1
        if progress is not None:
            progress(epoch, best, float(info["dynamics_nll"]))
        if stale >= args.dynamics_patience or (args.dynamics_max_epochs and epoch >= args.dynamics_max_epochs):
            break
    # bounds and other shared parameters keep their final values; members their best snapshot
    state = model.state_dict()
    for k, v in snapshot.items():
        if v.dim() == 3 and v.shape[0] == E:
            state[k].copy_(v)
    final = holdout_mse()
    model.elites.copy_(torch.argsort(final)[: args.n_elites])
    return {"dynamics_epochs": epoch, "dynamics_steps": steps, "holdout_mse": final.tolist(),
            "elites": model.elites.tolist(), "n_holdout": n_hold}


@torch.no_grad()
def model_rollout(model: DynamicsEnsemble, actor: Actor, start_obs: torch.Tensor, horizon: int,
                  term_fn: Callable, obs_mean: torch.Tensor, obs_std: torch.Tensor, chunk: int = 25_000) -> dict:
    """Roll pi in M^ for h steps from normalised start states; every sample uses a random elite at every
    step; branches stop once they terminate. Returns flat synthetic transitions (normalised obs)."""
    out = {k: [] for k in ("obs", "act", "rew", "next_obs", "done")}
    n_el = model.elites.numel()
    for c in range(0, start_obs.shape[0], chunk):  # chunks bound the memory of a large rollout
        s = start_obs[c: c + chunk]
        for _ in range(horizon):
            if s.shape[0] == 0:
                break
            a = actor.sample(s)[0]
            # random elite per sample at the cost of one member: shuffle the rows and cut them into
            # n_elites equal groups, each group goes through its own elite in one batched matmul
            n = s.shape[0]
            per = -(-n // n_el)  # ceil(n / n_elites) rows per elite; the last group is padded
            perm = torch.randperm(n, device=s.device)
            rows = torch.cat([perm, perm[torch.arange(per * n_el - n, device=s.device) % n]])
            x = torch.cat([s, a], -1)[rows].view(n_el, per, -1)  # [n_elites, per, obs + act]
            mean, logvar = model(x, members=model.elites)
            sample = (mean + torch.randn_like(mean) * (0.5 * logvar).exp()).reshape(n_el * per, -1)[:n]
            pred = torch.empty_like(sample)
            pred[perm] = sample  # back to the rows' order
            s2 = s + pred[:, :-1]
            r = pred[:, -1]
            done = term_fn(s2 * obs_std + obs_mean)  # termination is defined on raw observations
            for k, v in zip(out, (s, a, r, s2, done.float())):
                out[k].append(v)
            s = s2[~done]
    return {k: torch.cat(v) for k, v in out.items()}


def make_eval_envs(env: gym.Env, n: int) -> list[gym.Env]:
    """n copies of the evaluation env (the given one first), one per evaluation episode."""
    return [env] + [gym.make(env.spec) for _ in range(n - 1)]


@torch.no_grad()
def evaluate(actor: Actor, envs: list[gym.Env], seed: int, obs_mean, obs_std, device, pick: Optional[Callable] = None,
             record: Optional[list] = None, obs_noise: float = 0.0) -> np.ndarray:
    """Deterministic policy tanh(mu) in the real env: one episode per env, episode k in envs[k] reset
    with seed + k, all stepped in lockstep with one batched actor forward per step; raw returns [k].
    The forward runs in float64 on a copy of the actor: float32 matmuls of 1 row and of 10 rows round
    differently (~6e-8), which the simulator amplifies, so in float32 an episode's return would depend
    on how many episodes share the batch; in float64 it is the one-episode-at-a-time return
    (test_batched_evaluation_equals_sequential).
    pick: another way to act, normalised float64 states [n, obs] -> actions [n, act] (plot.py diagnose:
    the critic's choice); record: a list that receives, per episode, its (obs, act, next_obs, reward) steps;
    obs_noise: the policy sees its normalised state plus N(0, obs_noise^2) per dimension (a sensor-noise test
    of the trained policy, --eval-only --obs-noise), episode k's draws seeded by seed + k, like its reset."""
    pi = copy.deepcopy(actor).double()
    pick = pick or pi.act
    mean, std = obs_mean.double(), obs_std.double()
    obs = np.stack([env.reset(seed=seed + k)[0] for k, env in enumerate(envs)]).astype(np.float64)
    returns, running = np.zeros(len(envs)), np.ones(len(envs), dtype=bool)
    if obs_noise > 0:  # a generator per episode: batching changes nothing
        noise = [np.random.default_rng([seed + k, 1]) for k in range(len(envs))]
    if record is not None:
        record[:] = [[] for _ in envs]
    while running.any():
        live = np.flatnonzero(running)
        seen = (torch.as_tensor(obs[live], device=device) - mean) / std
        if obs_noise > 0:
            eps = np.stack([noise[k].standard_normal(seen.shape[1]) for k in live])
            seen = seen + obs_noise * torch.as_tensor(eps, device=device)
        act = pick(seen).cpu().numpy()
        for k, a in zip(live, act):
            o2, r, term, trunc, _ = envs[k].step(a)
            if record is not None:
                record[k].append((obs[k].copy(), a, o2, float(r)))
            obs[k] = o2
            returns[k] += r
            running[k] = not (term or trunc)
    return returns


# ====================================================================================================
# 7. Algorithm 1: data -> dynamics ensemble -> the maximin loop
# ====================================================================================================


def fit_dynamics(args: Args, model: DynamicsEnsemble, data: Data, gen: torch.Generator, log: "RunLog",
                 status: "Progress") -> dict:
    """Algorithm 1, step 2: train M^ on D (Eq. 9) (main() loads a saved one instead with --dynamics-path)."""
    t0 = time.time()
    D = data.D
    X = torch.cat([D["obs"], D["act"]], -1)  # [rows, obs + act]
    Y = torch.cat([D["next_obs"] - D["obs"], D["rew"][:, None]], -1)  # [rows, obs + 1]: (s' - s, r)

    def progress(epoch, best, nll):
        status(f"dynamics epoch {epoch}: holdout mse best {best.min():.4f}..{best.max():.4f}, nll {nll:.3f}, "
               f"{time.time() - t0:.0f}s")

    info = {**train_dynamics(model, X, Y, args, gen, progress), "source": "trained"}
    seconds = time.time() - t0
    status(f"dynamics: {info['dynamics_epochs']} epochs, elites {info['elites']}, holdout mse "
           f"{np.mean(info['holdout_mse']):.4f}, {seconds:.0f}s", force=True)
    log.dynamics(model, info, data)
    return {**info, "seconds": seconds}


def train(args: Args, ag: Agent, data: Data, synthetic: Optional[SyntheticBuffer], hist: History, log: "RunLog",
          start_step: int, status: "Progress") -> int:
    """Algorithm 1, step 3: epochs x steps_per_epoch gradient steps; an evaluation closes each epoch.
    With --bc the same loop trains the behaviour-cloning baseline (no rollouts, actor only)."""
    D, device = data.D, data.D["rew"].device
    total_steps = args.epochs * args.steps_per_epoch
    global_step, t_loop = start_step, time.time()
    for global_step in range(start_step + 1, total_steps + 1):
        # ---------------------------------------- ALGO LOGIC ----------------------------------------
        t0 = time.time()
        if synthetic is not None and (global_step - 1) % args.rollout_freq == 0:
            # --- model rollouts: h steps of pi in M^ from offline start states, into the FIFO buffer S ---
            start = D["obs"][torch.randint(data.rows, (args.rollout_batch_size,), device=device)]
            roll = model_rollout(ag.dynamics, ag.actor, start, args.rollout_length, data.term_fn, data.obs_mean,
                                 data.obs_std)
            synthetic.add(roll)
            hist.rollout(roll, time.time() - t0)
            t0 = time.time()
        set_actor_lr(ag, args, global_step)  # constant for DAMO; the peers' cosine schedule (appendix)
        # --- discriminator, critics, actor, temperature, target critics (Eqs. 3-8) ---
        info = bc_update(ag, D, args) if synthetic is None else damo_update(ag, D, synthetic, args)
        hist.timings["update_s"] += time.time() - t0
        if global_step % args.log_every == 0:  # the only host syncs of the loop; a non-finite loss stops here
            log.scalars(global_step, {**info, **hist.rollout_info}, hist.sps(global_step))
        # --- Algorithm 1, step 4: an epoch ends with the deterministic policy in the real environment ---
        epoch, end_of_epoch = divmod(global_step, args.steps_per_epoch)
        rets = None
        if end_of_epoch == 0 and (epoch % args.eval_every == 0 or global_step == total_steps):
            t0 = time.time()
            rets = evaluate(ag.actor, data.eval_envs, args.seed + 10_000, data.obs_mean, data.obs_std, device)
            hist.timings["eval_s"] += time.time() - t0

        # --------------- TRY NOT TO MODIFY: eval.csv, progress line, checkpoints (appendix) ---------------
        after_step(global_step, rets, args, ag, data, synthetic, hist, log, status, t_loop, start_step)
    return global_step


def main(args: Args, explicit: Optional[set] = None) -> dict:
    """One run: check the flags, seed, load D, open the run folder, build the networks, train or load
    M^ (or restore a checkpoint with --resume), run the loop, write results.json."""
    hist = History(t_start=time.time())
    check_args(args)
    ck = None
    # called from Python without `explicit`: every field that differs from the default counts as given
    explicit = explicit if explicit is not None else {f for f in Args.__dataclass_fields__
                                                      if getattr(args, f) != getattr(Args(), f)}
    if args.resume:
        ck, args = load_resume(args, explicit)

    # --- seeding (CleanRL block); a resumed run restores every RNG state from its checkpoint ---
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)

    check_run_folder(args)  # every input is checked before the run folder is made: a bad one leaves nothing
    t0 = time.time()
    data = prepare_data(args, device)
    hist.timings["data_s"] = time.time() - t0
    if ck is not None:
        check_resume_data(args, ck, data)  # a resumed run keeps the values it was started with
    else:
        args = with_env_defaults(args, data.info["env_family"], data.info["dataset"])
        args = with_peer_settings(args, data.info["dataset"], explicit)  # --penalty: MOPO's or MOBILE's settings
    start_step = 0 if ck is None else int(ck["global_step"])
    obs_dim, act_dim = data.D["obs"].shape[1], data.D["act"].shape[1]
    ag = make_agent(obs_dim, act_dim, args, device)
    ag.obs_std = data.obs_std
    compile_losses(args.compile)
    status = Progress()
    if ck is None and args.dynamics_path and not args.bc:  # Algorithm 1, step 2 with a saved M^
        hist.dynamics = load_dynamics(ag.dynamics, args.dynamics_path, data.obs_mean, data.obs_std, data.info)
        status(f"dynamics: loaded {args.dynamics_path}, elites {hist.dynamics['elites']}", force=True)
    log = RunLog(args, data.info, device, start_step, resumed=ck is not None)

    synthetic = None if args.bc else SyntheticBuffer(
        args.rollout_batch_size * args.rollout_length * args.model_retain_rollouts, obs_dim, act_dim, device)
    if ck is not None:
        restore_checkpoint(ck, args, ag, data, synthetic, hist)
        status(f"resumed {log.run_dir} at step {start_step} (dynamics from the checkpoint, not retrained)", force=True)
    elif not args.bc and not args.dynamics_path:
        hist.dynamics = fit_dynamics(args, ag.dynamics, data, gen, log, status)
        hist.timings["dynamics_s"] = hist.dynamics.pop("seconds", 0.0)
    if args.dynamics_only:
        log.close()
        return {"dynamics_path": os.path.join(log.run_dir, "dynamics.pt"), **hist.dynamics}

    global_step = train(args, ag, data, synthetic, hist, log, start_step, status)
    if args.heldout_episodes:  # the score to report: the final policy on start states no evaluation has seen
        hist.heldout = heldout_evaluation(ag.actor, data.eval_envs[0].spec, args.seed, args.heldout_episodes,
                                          data.obs_mean, data.obs_std, data.info, device)
    log.close()
    return log.results(args, data.info, hist, global_step, device)


# ====================================================================================================
# Appendix: plumbing (not part of DAMO). Flag checks, the peers' settings, the held-out score, Minari and
# D4RL loading, limited coverage, the run folder, checkpoints and --resume, --eval-only and video,
# --benchmark, progress, versions
# ====================================================================================================


# Allowed values of every numeric flag, checked by check_args() before any work starts:
# (lowest, highest, is the lowest itself allowed). None = unbounded on that side.
FLAG_RANGES = {
    "seed": (0, 2**32 - 1, True),  # numpy's seeds are 32-bit
    "threads": (0, None, True), "benchmark_repeats": (1, None, True), "checkpoint_every": (1, None, True),
    "log_every": (1, None, True), "snapshot_every": (0, None, True),
    "n_ensemble": (1, None, True), "n_elites": (1, None, True), "dynamics_hidden": (1, None, True),
    "dynamics_lr": (0, None, False), "dynamics_batch_size": (1, None, True), "dynamics_max_epochs": (1, None, True),
    "dynamics_patience": (1, None, True), "dynamics_holdout": (1, None, True),
    "rollout_freq": (1, None, True), "rollout_batch_size": (1, None, True), "rollout_length": (1, None, True),
    "model_retain_rollouts": (1, None, True), "real_ratio": (0, 1, False),
    "beta": (0, None, True), "logit_clip": (0, None, False), "disc_hidden": (1, None, True), "disc_lr": (0, None, False),
    "alpha": (0, None, True), "bc_coef": (0, None, True), "gamma": (0, 1, False), "tau": (0, 1, False),
    "batch_size": (2, None, True), "actor_lr": (0, None, False), "critic_lr": (0, None, False),
    "alpha_ent_lr": (0, None, False), "n_critics": (1, None, True), "hidden": (1, None, True),
    "epochs": (1, None, True), "steps_per_epoch": (1, None, True), "eval_episodes": (1, None, True),
    "eval_every": (1, None, True), "heldout_episodes": (0, 1000, True), "penalty_coef": (0, None, True),
    "penalty_samples": (1, None, True), "alpha_ent_fixed": (0, None, False), "data_fraction": (0, 1, False), "data_episodes": (1, None, True),
    "data_seed": (0, 2**32 - 1, True), "obs_noise": (0, None, True),
}


def check_args(args: "Args"):
    """Every flag's value, before any work: a value that cannot work is a DamoError naming the flag,
    the value and the allowed range (exit status 2, no run folder)."""
    for name, (lo, hi, lo_ok) in FLAG_RANGES.items():
        v = getattr(args, name)
        if v is None:
            continue
        flag = "--" + name.replace("_", "-")
        if not math.isfinite(v) or (lo is not None and (v < lo or (v == lo and not lo_ok))) or (hi is not None and v > hi):
            rng = ("[" if lo_ok else "(") + f"{lo}, " + (f"{hi}]" if hi is not None else "inf)")
            raise DamoError(f"{flag} {v} is out of range; allowed: {rng}")
    if args.dynamics_only and (args.bc or args.dynamics_path):
        raise DamoError("--dynamics-only trains an ensemble; it cannot be combined with --bc or --dynamics-path")
    if args.data_episodes is not None and args.data_fraction != 1.0:
        raise DamoError(f"--data-episodes {args.data_episodes} and --data-fraction {args.data_fraction} both choose the "
                        f"subset; pass one of them")
    if args.actor_lr_schedule not in ("constant", "cosine"):
        raise DamoError(f"--actor-lr-schedule {args.actor_lr_schedule}: unknown; pass constant or cosine")
    if args.penalty not in ("none", "mopo", "mobile"):
        raise DamoError(f"--penalty {args.penalty}: unknown; pass mopo, mobile or none")
    if args.penalty != "none" and args.bc:
        raise DamoError(f"--penalty {args.penalty} penalises the critic's target; --bc has no critic: drop one of them")
    if args.penalty == "none" and args.penalty_coef is not None:
        raise DamoError(f"--penalty-coef {args.penalty_coef} weighs a peer's penalty: pass --penalty mopo or mobile too")
    if args.penalty == "mobile" and args.n_elites < 2:
        raise DamoError(f"--penalty mobile takes a standard deviation across elites: --n-elites {args.n_elites} must be >= 2")
    if args.heldout and (not args.eval_only or args.obs_noise or args.capture_video or not args.heldout_episodes):
        raise DamoError("--heldout scores a saved policy on the held-out block: pass it with --eval-only RUN and "
                        "--heldout-episodes N >= 1 (runs score it themselves at the end), without --obs-noise or "
                        "--capture-video")
    if args.obs_noise and not args.eval_only:
        raise DamoError(f"--obs-noise {args.obs_noise} perturbs what a saved policy sees at --eval-only; training "
                        f"evaluations stay clean. Evaluate a finished run: --eval-only RUN --obs-noise {args.obs_noise}")
    if args.n_elites > args.n_ensemble:
        raise DamoError(f"--n-elites {args.n_elites} is more than --n-ensemble {args.n_ensemble}; allowed: 1..n_ensemble")


def check_writable(folder: str, flag: str):
    """A folder this process can write files in (or create): a real write in it or in its nearest existing
    parent, not os.access, which says yes to root whatever a folder's mode bits say. Creates nothing."""
    folder = os.path.abspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise DamoError(f"{flag} {folder} is a file, not a folder; pass a folder")
    parent = folder
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".damo-write-check-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise DamoError(f"{flag} {folder} cannot be written (a file in {parent} could not be created: "
                        f"{e.strerror or e}); pass a writable folder") from None


def check_run_folder(args: "Args"):
    """Before any work: --runs-dir must be writable, and an existing run folder is continued only with
    --resume, never overwritten. Creates nothing."""
    check_writable(args.runs_dir, "--runs-dir")
    if args.run_name and not args.resume:
        run_dir = os.path.join(args.runs_dir, args.run_name)
        if os.path.isdir(run_dir) and os.listdir(run_dir):
            raise DamoError(f"--run-name {args.run_name}: {run_dir} already holds a run. Continue it with --resume "
                            f"{run_dir} (and a larger --epochs if it finished), or pick another --run-name")


def explicit_flags(argv: list[str]) -> set:
    """The Args fields named on the command line (--env-id x, --env-id=x, --no-cuda -> env_id, cuda)."""
    names = set()
    for a in argv:
        if a.startswith("--"):
            n = a[2:].split("=", 1)[0].replace("-", "_")
            names.add(n[3:] if n.startswith("no_") and n[3:] in Args.__dataclass_fields__ else n)
    return names & set(Args.__dataclass_fields__)


# ----------------------------------------------------------------------------------------------------
# The paper's peers on this pipeline: MOPO's and MOBILE's published settings (--penalty)
# ----------------------------------------------------------------------------------------------------

# Per dataset (h, coefficient) as the peers' public code runs them (OfflineRL-Kit's MOPO comments,
# MOBILE's official configs; docs/peers.md), and the SAC settings both use: DAMO's alignments off
# (alpha 0, beta 0), real ratio 0.05, gamma 0.99, tau 0.005, temperature rate 1e-4, the actor's rate annealed
# by a cosine over the epochs; MOBILE backs up without the entropy term. Not reproduced: MOBILE's 30-epoch
# ensemble cap on walker2d-medium (a sweep's ensemble is shared by its variants).
PEER_COMMON = {"alpha": 0.0, "beta": 0.0, "real_ratio": 0.05, "gamma": 0.99, "tau": 0.005, "alpha_ent_lr": 1e-4,
               "actor_lr_schedule": "cosine"}
PEER_BACKUP_ENTROPY = {"mopo": True, "mobile": False}
PEER_SETTINGS = {  # penalty -> dataset -> settings
    "mopo": {
        "halfcheetah-medium": {"rollout_length": 5, "penalty_coef": 0.5},
        "hopper-medium": {"rollout_length": 5, "penalty_coef": 5.0},
        "walker2d-medium": {"rollout_length": 5, "penalty_coef": 0.5},
        "halfcheetah-medium-replay": {"rollout_length": 5, "penalty_coef": 0.5},
        "hopper-medium-replay": {"rollout_length": 5, "penalty_coef": 2.5},
        "walker2d-medium-replay": {"rollout_length": 1, "penalty_coef": 2.5},
        "halfcheetah-medium-expert": {"rollout_length": 5, "penalty_coef": 2.5},
        "hopper-medium-expert": {"rollout_length": 5, "penalty_coef": 5.0},
        "walker2d-medium-expert": {"rollout_length": 1, "penalty_coef": 2.5},
    },
    "mobile": {
        "halfcheetah-medium": {"rollout_length": 5, "penalty_coef": 0.5},
        "hopper-medium": {"rollout_length": 5, "penalty_coef": 1.5, "alpha_ent_fixed": 0.2},
        "walker2d-medium": {"rollout_length": 5, "penalty_coef": 0.5},
        "halfcheetah-medium-replay": {"rollout_length": 5, "penalty_coef": 0.1},
        "hopper-medium-replay": {"rollout_length": 5, "penalty_coef": 0.1, "alpha_ent_fixed": 0.2},
        "walker2d-medium-replay": {"rollout_length": 1, "penalty_coef": 0.5},
        "halfcheetah-medium-expert": {"rollout_length": 5, "penalty_coef": 1.0, "real_ratio": 0.5},
        "hopper-medium-expert": {"rollout_length": 5, "penalty_coef": 1.5},
        "walker2d-medium-expert": {"rollout_length": 1, "penalty_coef": 1.5},
    },
}


def peer_penalty(ag: Agent, args: Args) -> Optional[Callable]:
    """--penalty's function of (s, a) for critic_loss: coefficient * u(s, a); None without a penalty."""
    if args.penalty == "mopo":
        return lambda s, a: args.penalty_coef * mopo_penalty(ag.dynamics, s, a, ag.obs_std)
    if args.penalty == "mobile":
        return lambda s, a: args.penalty_coef * mobile_penalty(ag.dynamics, ag.critic_target, ag.actor, s, a,
                                                               args.penalty_samples)
    return None


def set_actor_lr(ag: Agent, args: Args, step: int):
    """--actor-lr-schedule cosine: at the first step of epoch e (from 0) of E, the actor's rate is
    actor_lr * (1 + cos(pi * e / E)) / 2, as the peers' code steps torch's CosineAnnealingLR(T_max=E) once per
    epoch. It depends on the step alone, so --resume continues it (with the new E if --epochs grew)."""
    if args.actor_lr_schedule == "cosine" and (step - 1) % args.steps_per_epoch == 0:
        epoch = (step - 1) // args.steps_per_epoch
        ag.actor_opt.param_groups[0]["lr"] = args.actor_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))


def with_peer_settings(args: Args, dataset: str, explicit: set) -> Args:
    """--penalty mopo|mobile: the peer's settings for this dataset in every field not given explicitly."""
    if args.penalty == "none":
        return args
    row = PEER_SETTINGS[args.penalty].get(dataset)
    if row is None and not {"penalty_coef", "rollout_length"} <= explicit:
        raise DamoError(f"--penalty {args.penalty}: no published setting for dataset '{dataset}' (published: "
                        f"{', '.join(sorted(PEER_SETTINGS[args.penalty]))}); pass --penalty-coef and --rollout-length")
    values = {**PEER_COMMON, "backup_entropy": PEER_BACKUP_ENTROPY[args.penalty], **(row or {})}
    return replace(args, **{k: v for k, v in values.items() if k not in explicit})


# ----------------------------------------------------------------------------------------------------
# The reported score: the final policy on held-out start states
# ----------------------------------------------------------------------------------------------------


# Held-out start states [ours; the protocol's statistics, Agarwal et al. 2021]: training evaluations reset episode
# k with seed + 10_000 + k, and with seeds below 2^32 every start seed they can use is below 2^33. The final
# policy is scored on a block above all of them, 1,000 seeds per run seed (so blocks of different seeds never
# meet either): episodes that no evaluation during training, and so no setting chosen by one, has seen.
HELDOUT_SEED_BASE = 2**34


def heldout_seeds(seed: int, n: int) -> range:
    return range(HELDOUT_SEED_BASE + 1000 * seed, HELDOUT_SEED_BASE + 1000 * seed + n)


def heldout_evaluation(actor: Actor, env_id, seed: int, n: int, obs_mean, obs_std, info: dict, device) -> dict:
    """The final policy, deterministic, for n episodes on the held-out block of run seed `seed`."""
    block = heldout_seeds(seed, n)
    envs = [gym.make(env_id) for _ in range(n)]
    rets = evaluate(actor, envs, block.start, obs_mean, obs_std, device)
    for e in envs:
        e.close()
    norm = normalized_score(rets, info)
    return {"episodes": n, "seeds": [block.start, block.stop], "normalized_score": float(norm.mean()),
            "normalized_score_std": float(norm.std()), "return_mean": float(rets.mean()),
            "return_std": float(rets.std()), "returns": rets.tolist()}


# ----------------------------------------------------------------------------------------------------
# D's arrays for a run: its dataset, cut to a subset of episodes for the limited-coverage experiment
# ----------------------------------------------------------------------------------------------------


def load_offline(args: Args) -> tuple[dict, dict, gym.Env]:
    """D's arrays (a Minari dataset, or a D4RL file with --dataset-path), cut to the run's episodes."""
    if args.dataset_path:
        arrays, info, env = load_d4rl_hdf5(args.dataset_path, args.env_id)
    else:
        arrays, info, env = load_dataset(args.env_id, download=args.download)
    arrays, info = limit_coverage(arrays, info, args)
    return arrays, info, env


def limit_coverage(arrays: dict, info: dict, args: Args) -> tuple[dict, dict]:
    """Limited coverage (the paper claims robustness to it; how it is made is ours): keep a random subset of
    D's episodes, --data-episodes of them or a --data-fraction, drawn with --data-seed. Everything after
    this sees only the subset: the ensemble, the batches, rollout starts, the normalisation statistics,
    the data's average return. Whole episodes are kept, so every kept transition keeps its true successor."""
    n_ep = int(arrays["episode"].max()) + 1 if len(arrays["episode"]) else 0
    k = args.data_episodes if args.data_episodes is not None else max(1, round(args.data_fraction * n_ep))
    if k > n_ep:
        raise DamoError(f"--data-episodes {k}: the dataset has only {n_ep} episodes; pass at most {n_ep}, or a "
                        f"--data-fraction")
    if k < n_ep:
        keep = np.random.default_rng(args.data_seed).choice(n_ep, size=k, replace=False)
        rows = np.isin(arrays["episode"], keep)
        arrays = {key: v[rows] for key, v in arrays.items()}
    n = len(arrays["rewards"])
    need = args.dynamics_batch_size + min(int(0.2 * n), args.dynamics_holdout) if not args.bc else 2
    if n < need:
        what = f"--data-episodes {k}" if args.data_episodes is not None else f"--data-fraction {args.data_fraction}"
        raise DamoError(f"{what} keeps {k} of {n_ep} episodes, {n} transitions: too few to train on (the ensemble needs "
                        f"{need}: a batch of --dynamics-batch-size {args.dynamics_batch_size} after its holdout); "
                        f"keep more episodes")
    returns = np.bincount(np.unique(arrays["episode"], return_inverse=True)[1], weights=arrays["rewards"])
    info = {**info, "n_transitions": n, "n_episodes": k, "data_return_mean": float(returns.mean()),
            "data_score_mean": float(normalized_score(returns.mean(), info)) if info["ref_min_score"] is not None else None}
    if k < n_ep:
        info["coverage"] = {"episodes": k, "of_episodes": n_ep, "data_seed": args.data_seed}
    return arrays, info


# ----------------------------------------------------------------------------------------------------
# Minari: dataset ids, versions, download, loading into flat arrays
# ----------------------------------------------------------------------------------------------------


def dataset_name(source: str) -> str:
    """ENV_DEFAULTS' name of a dataset: 'walker2d-medium-expert' from that short id, the Minari id
    mujoco/walker2d/medium-expert-v0 or the D4RL file walker2d_medium_expert-v2.hdf5."""
    name = os.path.basename(source) if source.endswith(".hdf5") else source.removeprefix("mujoco/")
    return re.sub(r"(-v\d+)?(\.hdf5)?$", "", name.lower()).replace("/", "-").replace("_", "-")


ENVS = ("hopper", "halfcheetah", "walker2d")
QUALITIES = ("simple", "medium", "expert", "medium-expert", "medium-replay")
SHORT_IDS = [f"{e}-{q}" for e in ENVS for q in QUALITIES]
# The Gymnasium env of each family (for --benchmark shapes and for D4RL files, whose obs match v5's).
BENCH_ENVS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}


def load_dataset(env_id: str, download: bool = True) -> tuple[dict, dict, gym.Env]:
    """Load D as flat float32 arrays (observations, actions, rewards, next_observations, terminals),
    with info (ids, reference scores) and the evaluation environment (the dataset's own)."""
    import minari

    ids, family = dataset_ids_for(env_id, download)
    parts, refs, datasets = [], [], []
    for did in ids:
        try:
            ds = minari.load_dataset(did, download=download)
        except FileNotFoundError:
            raise DamoError(missing_dataset_message(did, "locally (--no-download)")) from None
        except Exception as e:
            raise DamoError(missing_dataset_message(did, f"and the download failed: {e}")) from None
        datasets.append(ds)
        meta = ds.storage.metadata
        refs.append((meta.get("ref_min_score"), meta.get("ref_max_score")))
        for ep in ds.iterate_episodes():
            obs = np.asarray(ep.observations, dtype=np.float32)  # [T+1, obs_dim]
            parts.append(dict(episode=np.full(len(ep.rewards), len(parts), dtype=np.int64),
                observations=obs[:-1], next_observations=obs[1:],
                actions=np.asarray(ep.actions, dtype=np.float32),
                rewards=np.asarray(ep.rewards, dtype=np.float32),
                # bootstrap mask: terminations only; a time-limit truncation must still bootstrap
                terminals=np.asarray(ep.terminations, dtype=np.float32),
            ))
    if sum(len(p["rewards"]) for p in parts) == 0:
        raise DamoError(f"dataset {ids} holds no transitions; regenerate it (make_dataset.py --steps N with N > 0) "
                        f"or pass another --env-id")
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    for k, v in data.items():
        if not np.isfinite(v).all():
            raise DamoError(f"dataset {ids} has {int((~np.isfinite(v)).sum())} non-finite values in '{k}'; "
                            "clean or regenerate it")
    env = datasets[0].recover_environment(eval_env=True)
    if refs[0][0] is not None and refs[0][1] is not None and all(r == refs[0] for r in refs):
        ref, ref_source = refs[0], "dataset"
    elif family in D4RL_REF:
        ref, ref_source = D4RL_REF[family], "D4RL (approximate on v5 data)"
    else:
        ref, ref_source = (None, None), "none"
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    if data["observations"].shape[1] != obs_dim or data["actions"].shape[1] != act_dim:
        raise DamoError(f"dataset shapes obs {data['observations'].shape[1]}, act {data['actions'].shape[1]} "
                        f"do not match the env {env.spec.id} ({obs_dim}, {act_dim})")
    info = dict(dataset_ids=ids, env_family=family, dataset=dataset_name(env_id), eval_env_id=env.spec.id if env.spec else None,
                ref_min_score=ref[0], ref_max_score=ref[1], ref_source=ref_source,
                n_transitions=int(len(data["rewards"])), n_episodes=sum(d.total_episodes for d in datasets),
                n_transitions_per_dataset=[int(d.total_steps) for d in datasets],
                action_noise=[d.storage.metadata.get("action_noise") for d in datasets],
                minari_version=minari.__version__)
    return data, info, env


def _remote_reachable(timeout: float = 5.0) -> bool:
    """Is Minari's remote reachable? One TCP connect, so a machine without network fails in seconds
    instead of after Minari's ~25 s of retries."""
    remote = os.environ.get("MINARI_REMOTE", "hf://farama-minari")
    if remote.startswith("hf://"):
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    elif remote.startswith("gcp://"):
        host = "storage.googleapis.com"
    else:
        host = urlparse(remote).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_minari_id(dataset_id: str, download: bool, required: bool = True) -> Optional[str]:
    """Turn `ns/name` or `ns/name-vN` into an existing id: a given version as is; otherwise the newest
    local version, else the newest compatible remote version (fetched later by load_dataset)."""
    import minari
    from minari.dataset.minari_dataset import parse_dataset_id

    m = re.fullmatch(r"(?:(?P<ns>[\w.-]+(?:/[\w.-]+)*)/)?(?P<name>[\w.-]+?)(?:-v(?P<v>\d+))?", dataset_id)
    if m is None:
        raise DamoError(f"malformed Minari id '{dataset_id}' (expected namespace/name or namespace/name-vN)")
    if m["v"] is not None:
        return dataset_id
    namespace, name = m["ns"], m["name"]
    local = [parse_dataset_id(i)[2] for i in minari.list_local_datasets(prefix=namespace)
             if parse_dataset_id(i)[:2] == (namespace, name)]
    if local:
        return f"{namespace}/{name}-v{max(local)}"
    if download:
        if not _remote_reachable():
            if not required:
                return None
            raise DamoError(missing_dataset_message(dataset_id, "and Minari's remote cannot be reached (no network?)"))
        try:
            remote = minari.list_remote_datasets(prefix=f"{namespace}/{name}", compatible_minari_version=True)
        except ImportError as e:
            raise DamoError(f"downloading needs minari's hub support: pip install 'minari[hf]' ({e})") from None
        except Exception as e:  # network errors come from several client libraries
            if not required:
                return None
            raise DamoError(missing_dataset_message(dataset_id, f"and listing the remote failed: {e}")) from None
        versions = [parse_dataset_id(i)[2] for i in remote if parse_dataset_id(i)[:2] == (namespace, name)]
        if versions:
            return f"{namespace}/{name}-v{max(versions)}"
    if required:
        raise DamoError(missing_dataset_message(dataset_id, "locally" + ("" if download else " (--no-download)")))
    return None


def missing_dataset_message(dataset_id: str, why: str) -> str:
    from minari.storage import get_dataset_path

    if "medium-replay" in dataset_id:  # Minari hosts mujoco/{env}/{simple,medium,expert}-v0, no replay sets
        versioned = dataset_id if re.search(r"-v\d+$", dataset_id) else dataset_id + "-v0"
        return (f"Minari dataset '{dataset_id}' was not found {why}.\nSearched: {get_dataset_path()}.\n"
                f"Minari's hosted MuJoCo datasets have no medium-replay set (hosted: simple, medium, expert; "
                f"medium-expert is combined from medium and expert). Build one locally with make_dataset.py --mix, "
                f"behaviour policies in training order: python make_dataset.py --env-id ENV-v5 --dataset-id {versioned} --mix "
                f"random:STEPS POLICY.npz:STEPS ... (README 'Data' has the command for each environment)")
    return (
        f"Minari dataset '{dataset_id}' was not found {why}.\n"
        f"Searched: {get_dataset_path()} (set MINARI_DATASETS_PATH to look elsewhere).\n"
        f"On a machine with network: pip install 'minari[hf]' && minari download {dataset_id}\n"
        f"(or run damo.py there once), then copy that folder here. "
        f"README 'Local data' shows how to build a local stand-in from the carried behaviour policies."
    )


def dataset_ids_for(env_id: str, download: bool) -> tuple[list[str], str]:
    """Map --env-id to the Minari ids to load (two for a medium-expert that must be combined) and the
    environment family ('hopper', ...; '' if unknown). Raises DamoError for an unknown id."""
    if "/" not in env_id:
        if env_id not in SHORT_IDS:
            raise DamoError(f"unknown --env-id '{env_id}'. Accepted short ids: {', '.join(SHORT_IDS)}; "
                            "or a full Minari id such as mujoco/hopper/medium-v0")
        family, quality = env_id.split("-", 1)
        base = f"mujoco/{family}/{quality}"
    else:
        base, family = env_id, next((e for e in ENVS if f"/{e}/" in env_id), "")
    if base.endswith("/medium-expert") or "/medium-expert-v" in base:
        # A published medium-expert (Minari's -v2 scripts build one) wins; otherwise combine the two
        # sets, as D4RL built medium-expert by concatenating medium and expert.
        published = resolve_minari_id(base, download, required=False)
        if published is not None:
            return [published], family
        stem = base.rsplit("/", 1)[0]
        return [resolve_minari_id(f"{stem}/medium", download), resolve_minari_id(f"{stem}/expert", download)], family
    return [resolve_minari_id(base, download)], family


# ----------------------------------------------------------------------------------------------------
# D4RL -v2 hdf5 files (--dataset-path)
# ----------------------------------------------------------------------------------------------------


D4RL_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")


def load_d4rl_hdf5(path: str, env_id: str) -> tuple[dict, dict, gym.Env]:
    """--dataset-path: a D4RL -v2 hdf5 file (flat arrays, one row per transition). `terminals` is the
    bootstrap mask; `timeouts` end an episode without terminating, so they only count episodes. The env
    family comes from the file name (hopper_medium_expert-v2.hdf5), else from --env-id; evaluation runs
    in the Gymnasium v5 env of that family with D4RL's reference returns (docs/data.md)."""
    import h5py

    name = os.path.basename(path).lower()
    family = next((e for e in ENVS if e in name), None) or (env_id.split("-")[0] if env_id in SHORT_IDS else None)
    if family is None:
        raise DamoError(f"--dataset-path {path}: cannot tell the environment from the file name; name it like "
                        f"D4RL's (hopper_medium-v2.hdf5) or pass a short --env-id such as hopper-medium")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in D4RL_KEYS if k not in f]
            if missing:
                raise DamoError(f"--dataset-path {path} lacks {missing}: expected D4RL's -v2 layout with keys "
                                f"{', '.join(D4RL_KEYS)} (-v0/-v1 files have no next_observations; use -v2)")
            raw = {k: np.asarray(f[k], dtype=np.float32) for k in D4RL_KEYS}
    except (OSError, ValueError) as e:  # missing file, not hdf5, truncated
        raise DamoError(f"--dataset-path {path}: cannot read it as hdf5 ({type(e).__name__}: {e})") from None
    lengths = {k: len(v) for k, v in raw.items()}
    if len(set(lengths.values())) != 1:
        raise DamoError(f"--dataset-path {path}: arrays have different lengths {lengths}")
    if lengths["rewards"] == 0:
        raise DamoError(f"--dataset-path {path} holds no transitions (its arrays have 0 rows); pass a filled D4RL file")
    for k, v in raw.items():
        if not np.isfinite(v).all():
            raise DamoError(f"--dataset-path {path} has {int((~np.isfinite(v)).sum())} non-finite values in '{k}'")
    env = gym.make(BENCH_ENVS[family])
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    if raw["observations"].shape[1:] != (obs_dim,) or raw["next_observations"].shape[1:] != (obs_dim,) \
            or raw["actions"].shape[1:] != (act_dim,):
        raise DamoError(f"--dataset-path {path}: obs {raw['observations'].shape[1:]}, act {raw['actions'].shape[1:]} "
                        f"do not match {env.spec.id} (({obs_dim},), ({act_dim},)); is it a {family} file?")
    ends = (raw["terminals"] > 0.5) | (raw["timeouts"] > 0.5)
    data = {k: raw[k] for k in ("observations", "actions", "rewards", "next_observations")}
    data["terminals"] = (raw["terminals"] > 0.5).astype(np.float32)  # timeouts still bootstrap
    data["episode"] = np.concatenate([[0], np.cumsum(ends[:-1])]).astype(np.int64)
    ref = D4RL_REF[family]
    info = dict(dataset_ids=[f"d4rl:{os.path.basename(path)}"], env_family=family, dataset=dataset_name(path),
                eval_env_id=env.spec.id,
                ref_min_score=ref[0], ref_max_score=ref[1],
                ref_source=f"D4RL reference returns, evaluated in {env.spec.id} (not D4RL's mujoco-py env)",
                n_transitions=int(len(data["rewards"])), n_episodes=int(ends.sum() + (not ends[-1])),
                dataset_path=os.path.abspath(path))
    return data, info, env


# ----------------------------------------------------------------------------------------------------
# What a run has measured so far, and the run folder: TensorBoard, config.json, eval.csv, dynamics.pt, results.json (W&B with --track)
# ----------------------------------------------------------------------------------------------------


@dataclass
class History:
    """What a run has measured so far (saved in every checkpoint, written to results.json at the end)."""

    t_start: float
    scores: list = field(default_factory=list)  # normalised score of each evaluation
    returns: list = field(default_factory=list)  # mean raw return of each evaluation
    last_returns: Optional[list] = None  # the episodes' returns of the last evaluation
    rollout_info: dict = field(default_factory=dict)
    timings: dict = field(default_factory=lambda: {k: 0.0 for k in ("data_s", "dynamics_s", "rollout_s", "update_s", "eval_s")})
    dynamics: dict = field(default_factory=dict)
    resumed_at: list = field(default_factory=list)
    heldout: Optional[dict] = None  # the final policy on the held-out block (main(), at the end)

    def sps(self, step: int) -> float:
        return step / max(self.timings["update_s"] + self.timings["rollout_s"], 1e-9)

    def rollout(self, roll: dict, seconds: float):
        self.timings["rollout_s"] += seconds
        self.rollout_info = {"rollout_transitions": roll["rew"].shape[0], "rollout_reward": roll["rew"].mean(),
                             "rollout_done_rate": roll["done"].mean()}


def after_step(step: int, rets: Optional[np.ndarray], args: Args, ag: Agent, data: Data, synthetic, hist: History,
               log: "RunLog", status: "Progress", t_loop: float, start_step: int):
    """What train() does after each gradient step besides DAMO: record an evaluation (eval.csv, TensorBoard,
    the progress line), show progress, write the checkpoint and snapshots."""
    total_steps = args.epochs * args.steps_per_epoch
    if rets is not None:
        norm = normalized_score(rets, data.info)
        hist.scores.append(float(norm.mean()))
        hist.returns.append(float(rets.mean()))
        hist.last_returns = rets.tolist()
        log.evaluation(step, step // args.steps_per_epoch, rets, norm, time.time() - hist.t_start)
        status(f"epoch {step // args.steps_per_epoch}/{args.epochs} step {step}: return {rets.mean():.1f} +- "
               f"{rets.std():.1f}, score {norm.mean():.1f}, {hist.sps(step):.0f} steps/s, "
               f"{time_left(t_loop, step - start_step, total_steps - step)} left", force=True)
    elif step % 100 == 0:
        last = f"{hist.scores[-1]:.1f}" if hist.scores else "-"
        left = time_left(t_loop, step - start_step, total_steps - step) if hist.scores else "?"
        status(f"step {step}/{total_steps}, {hist.sps(step):.0f} steps/s, last score {last}, {left} left")
    if step % args.checkpoint_every == 0 or step == total_steps:
        log.writer.flush()  # the TensorBoard events up to the checkpoint are on disk with it
        save_checkpoint(os.path.join(log.run_dir, "checkpoint.pt"), step, args, ag, data, synthetic, hist)
    if args.snapshot_every and step % args.snapshot_every == 0:  # the policy and critic at this step, kept
        os.makedirs(os.path.join(log.run_dir, "snapshots"), exist_ok=True)
        save_checkpoint(os.path.join(log.run_dir, "snapshots", f"step_{step:07d}.pt"), step, args, ag, data, None,
                        hist)


class RunLog:
    """runs/{run_name}/ and everything written into it while a run trains."""

    EVAL_HEADER = ["global_step", "epoch", "return_mean", "return_std", "normalized_score", "normalized_score_std",
                   "wall_time_s"]

    def __init__(self, args: Args, info: dict, device, start_step: int, resumed: bool):
        from torch.utils.tensorboard import SummaryWriter

        name = args.run_name or f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        self.run_dir = os.path.join(args.runs_dir, name)
        os.makedirs(self.run_dir, exist_ok=True)
        # purge_step: TensorBoard drops events a killed run logged after its last checkpoint (no duplicates)
        self.writer = SummaryWriter(self.run_dir, purge_step=start_step + 1 if resumed else None)
        eval_path = os.path.join(self.run_dir, "eval.csv")
        rows = []
        if not resumed:
            self.writer.add_text("hyperparameters",
                                 "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
            config = {"args": asdict(args), "data": info, "device": str(device), "versions": package_versions()}
            with open(os.path.join(self.run_dir, "config.json"), "w") as f:
                json.dump(config, f, indent=2)
        elif os.path.isfile(eval_path):  # keep the evaluations up to the checkpoint; later ones are redone
            with open(eval_path, newline="") as f:
                rows = [r for r in list(csv.reader(f))[1:] if r and int(r[0]) <= start_step]
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config={"args": asdict(args), "data": info}, name=name, save_code=True, id=name, resume="allow")
        with open(eval_path + ".tmp", "w", newline="") as f:  # (re)written atomically, then appended row by row
            csv.writer(f).writerows([self.EVAL_HEADER, *rows])
        os.replace(eval_path + ".tmp", eval_path)
        self.eval_file = open(eval_path, "a", newline="")
        self.eval_csv = csv.writer(self.eval_file)
        print(f"run {self.run_dir}: {info['dataset_ids']} ({info['n_transitions']} transitions, {info['n_episodes']} "
              f"episodes), eval env {info['eval_env_id']}, scores: {info['ref_source']}, device {device}"
              + (f", resumed at step {start_step}" if resumed else ""), file=sys.stderr)

    def dynamics(self, model: DynamicsEnsemble, info: dict, data: "Data"):
        for k, v in enumerate(info["holdout_mse"]):
            self.writer.add_scalar("diagnostics/dynamics_holdout_mse", v, k)
        save_atomic({"dynamics": model.state_dict(), "obs_mean": data.obs_mean.cpu(), "obs_std": data.obs_std.cpu(),
                     "data": data.info, "info": info}, os.path.join(self.run_dir, "dynamics.pt"))

    def scalars(self, step: int, info: dict, sps: float):
        for k, v in ((k, float(v)) for k, v in info.items()):
            if not math.isfinite(v):
                self.close()
                raise DamoError(f"non-finite {k} = {v} at gradient step {step}; the run stopped "
                                f"(files so far are in {self.run_dir}). Try a smaller learning rate or alpha.")
            group = "losses/" if k.endswith(("loss", "_mse")) else "diagnostics/"
            self.writer.add_scalar(group + k, v, step)
        self.writer.add_scalar("charts/SPS", sps, step)

    def evaluation(self, step: int, epoch: int, rets: np.ndarray, norm: np.ndarray, wall_s: float):
        self.eval_csv.writerow([step, epoch, f"{rets.mean():.4f}", f"{rets.std():.4f}", f"{norm.mean():.4f}",
                                f"{norm.std():.4f}", f"{wall_s:.2f}"])
        self.eval_file.flush()
        self.writer.add_scalar("charts/return_mean", rets.mean(), step)
        self.writer.add_scalar("charts/normalized_score", norm.mean(), step)

    def close(self):
        self.eval_file.close()
        self.writer.close()

    def results(self, args: Args, info: dict, hist: "History", global_step: int, device) -> dict:
        scores, returns = hist.scores, hist.returns
        train_s = hist.timings["update_s"] + hist.timings["rollout_s"]
        results = {
            "env_id": args.env_id, "dataset_ids": info["dataset_ids"], "seed": args.seed,
            "variant": ("bc" if args.bc else f"{args.penalty}(coef={args.penalty_coef})" if args.penalty != "none"
                        else f"damo(alpha={args.alpha},beta={args.beta},eta={args.bc_coef})"),
            "global_steps": global_step, "eval_episodes": args.eval_episodes,
            "final_normalized_score": scores[-1] if scores else None,
            "last10_normalized_score": float(np.mean(scores[-10:])) if scores else None,
            "final_return_mean": returns[-1] if returns else None,
            "last10_return_mean": float(np.mean(returns[-10:])) if returns else None,
            "final_returns": hist.last_returns,
            "heldout_normalized_score": hist.heldout["normalized_score"] if hist.heldout else None,
            "heldout": hist.heldout,
            "score_reference": info["ref_source"],
            "gradient_steps_per_s": global_step / max(train_s, 1e-9),
            "wall_time_s": {**hist.timings, "total_s": time.time() - hist.t_start},
            "dynamics": hist.dynamics, "resumed_at_steps": hist.resumed_at, "device": str(device),
            "versions": package_versions(),
        }
        with open(os.path.join(self.run_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(json.dumps({k: results[k] for k in ("final_normalized_score", "last10_normalized_score",
                                                  "heldout_normalized_score", "final_return_mean",
                                                  "gradient_steps_per_s")}))
        return results


# ----------------------------------------------------------------------------------------------------
# Checkpoints and --resume: save_checkpoint / restore_checkpoint are the only places that know what a
# checkpoint holds (agent_state / load_agent_state hold the networks' part)
# ----------------------------------------------------------------------------------------------------


# checkpoint key -> Agent field; with agent_state / load_agent_state, the only code that knows the networks'
# part of a checkpoint
AGENT_MODULES = {"actor": "actor", "dynamics": "dynamics", "discriminator": "disc", "critic": "critic",
                 "critic_target": "critic_target"}
AGENT_OPTIMIZERS = {"actor": "actor_opt", "critic": "critic_opt", "discriminator": "disc_opt",
                    "alpha_ent": "alpha_ent_opt"}


def agent_state(ag: Agent) -> dict:
    out = {k: getattr(ag, f).state_dict() if getattr(ag, f) is not None else None for k, f in AGENT_MODULES.items()}
    out["log_alpha_ent"] = ag.log_alpha_ent.detach().cpu() if ag.log_alpha_ent is not None else None
    out["optimizers"] = {k: getattr(ag, f).state_dict() for k, f in AGENT_OPTIMIZERS.items()
                         if getattr(ag, f) is not None}
    return out


def load_agent_state(ag: Agent, state: dict, optimizers: bool = True):
    for k, f in AGENT_MODULES.items():
        if getattr(ag, f) is not None:
            getattr(ag, f).load_state_dict(state[k])
    if ag.log_alpha_ent is not None:
        with torch.no_grad():
            ag.log_alpha_ent.copy_(state["log_alpha_ent"])
    if optimizers:
        for k, f in AGENT_OPTIMIZERS.items():
            if getattr(ag, f) is not None:
                getattr(ag, f).load_state_dict(state["optimizers"][k])


def save_checkpoint(path: str, step: int, args: Args, ag: Agent, data: "Data", synthetic, hist: "History"):
    """Everything needed to continue exactly: networks, optimisers, temperature, synthetic buffer,
    RNG states, the step and the run's history (written atomically)."""
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if data.obs_mean.device.type == "cuda" else None}
    buffer = None
    if synthetic is not None and args.checkpoint_buffer:
        buffer = {"size": synthetic.size, "ptr": synthetic.ptr,
                  "data": {k: v[: synthetic.size] for k, v in synthetic.data.items()}}
    save_atomic({
        "args": asdict(args), "data": data.info, "global_step": step,
        "obs_mean": data.obs_mean.cpu(), "obs_std": data.obs_std.cpu(), **agent_state(ag),
        "synthetic": buffer, "rng": rng,
        "progress": {"scores": hist.scores, "returns": hist.returns, "last_returns": hist.last_returns,
                     "rollout_info": {k: float(v) for k, v in hist.rollout_info.items()}, "timings": hist.timings,
                     "elapsed_s": time.time() - hist.t_start, "dynamics": hist.dynamics,
                     "resumed_at": hist.resumed_at},
    }, path)


def restore_checkpoint(ck: dict, args: Args, ag: Agent, data: "Data", synthetic, hist: "History"):
    """The inverse of save_checkpoint. The RNG states are restored last, so that refilling the synthetic
    buffer (a checkpoint written with --no-checkpoint-buffer) does not shift the random streams."""
    load_agent_state(ag, ck)
    p = ck["progress"]
    hist.scores, hist.returns, hist.last_returns, hist.dynamics = p["scores"], p["returns"], p["last_returns"], p["dynamics"]
    hist.rollout_info, hist.timings = p["rollout_info"], p["timings"]
    hist.resumed_at = p["resumed_at"] + [int(ck["global_step"])]
    hist.t_start = time.time() - p["elapsed_s"]
    if synthetic is not None and ck["synthetic"] is not None:
        b = ck["synthetic"]
        for k, v in b["data"].items():
            synthetic.data[k][: b["size"]] = v.to(synthetic.data[k].device)
        synthetic.size, synthetic.ptr = b["size"], b["ptr"]
    elif synthetic is not None:  # documented rebuild (--no-checkpoint-buffer): fresh rollouts of the current policy
        for _ in range(args.model_retain_rollouts):
            start = data.D["obs"][torch.randint(data.rows, (args.rollout_batch_size,), device=data.obs_mean.device)]
            synthetic.add(model_rollout(ag.dynamics, ag.actor, start, args.rollout_length, data.term_fn,
                                        data.obs_mean, data.obs_std))
    random.setstate(ck["rng"]["python"])
    np.random.set_state(ck["rng"]["numpy"])
    torch.set_rng_state(ck["rng"]["torch"])
    if data.obs_mean.device.type == "cuda" and ck["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state_all(ck["rng"]["cuda"])


def check_resume_data(args: Args, ck: dict, data: "Data"):
    if (ck["data"]["dataset_ids"] != data.info["dataset_ids"] or ck["data"]["n_transitions"] != data.rows
            or not torch.allclose(ck["obs_mean"].to(data.obs_mean), data.obs_mean)):
        raise DamoError(f"--resume {args.resume}: the run trained on {ck['data']['dataset_ids']} "
                        f"({ck['data']['n_transitions']} transitions); the data found now is {data.info['dataset_ids']} "
                        f"({data.rows}). Point MINARI_DATASETS_PATH / --dataset-path at the run's data.")


def saved_args(ck: dict) -> Args:
    """A checkpoint's Args: keys of flags this damo.py no longer has are dropped, flags it has gained take
    their defaults, so that checkpoints of older versions still load."""
    return Args(**{k: v for k, v in ck["args"].items() if k in Args.__dataclass_fields__})


def load_agent(path: str, device="cpu") -> tuple[Agent, dict]:
    """A run folder (or its checkpoint.pt) -> (the Agent with the saved weights, the checkpoint dict:
    args, data info, obs_mean/obs_std, global_step). Used by --eval-only, plot.py and the tests."""
    path = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    try:
        ck = torch.load(path, map_location=device, weights_only=False)
        args = replace(saved_args(ck), compile=False)
        obs_dim = ck["obs_mean"].numel()
        act_dim = [v for v in ck["actor"].values() if v.dim() == 2][-1].shape[0] // 2  # last layer: mean, log-std
        ag = make_agent(obs_dim, act_dim, args, device)
        load_agent_state(ag, ck, optimizers=False)
    except Exception as e:
        raise DamoError(f"cannot load a checkpoint from {path} ({type(e).__name__}: {e})") from None
    ck["path"] = path
    return ag, ck


RESUME_MAY_CHANGE = ("resume", "epochs", "threads", "cuda", "log_every", "checkpoint_every", "snapshot_every", "track",
                     "wandb_project_name", "wandb_entity", "download", "compile", "heldout_episodes")


def load_resume(args: Args, explicit: set) -> tuple[dict, Args]:
    """--resume RUN: read RUN/checkpoint.pt and rebuild the run's Args from it. A flag given on the
    command line that contradicts the run (another --env-id, --seed, alpha ...) is an error, not a
    silent override; only RESUME_MAY_CHANGE may differ."""
    run_dir = os.path.normpath(args.resume)
    if os.path.isfile(run_dir) and os.path.basename(run_dir) == "checkpoint.pt":  # RUN/checkpoint.pt means RUN
        run_dir = os.path.dirname(run_dir) or "."
    elif os.path.isfile(run_dir):
        raise DamoError(f"--resume {run_dir} is a file; pass the run's folder (the one that holds checkpoint.pt)")
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        raise DamoError(f"--resume {run_dir}: no checkpoint.pt there (runs write one every --checkpoint-every steps)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        saved, step = ck["args"], int(ck["global_step"])
        if "rng" not in ck or "progress" not in ck:
            raise KeyError("no training state (rng, progress) in it")
    except Exception as e:
        raise DamoError(f"--resume {run_dir}: checkpoint.pt cannot be loaded ({type(e).__name__}: {e}); it is "
                        f"truncated, corrupt or from an older damo.py. Nothing in {run_dir} was changed.") from None
    clash = [f for f in sorted(explicit) if f not in RESUME_MAY_CHANGE and f in saved and getattr(args, f) != saved[f]]
    if clash:
        what = ", ".join(f"--{f.replace('_', '-')} {saved[f]!r} (asked: {getattr(args, f)!r})" for f in clash)
        raise DamoError(f"--resume {run_dir}: that run has {what}. A resumed run keeps its settings; drop those "
                        f"flags, or start a new run. May change: "
                        f"{', '.join('--' + f.replace('_', '-') for f in RESUME_MAY_CHANGE[1:])}.")
    new = Args(**{**saved, **{f: getattr(args, f) for f in RESUME_MAY_CHANGE if f in explicit}})
    new.resume, new.runs_dir, new.run_name = run_dir, os.path.dirname(run_dir) or ".", os.path.basename(run_dir)
    # A run killed after its last checkpoint but before results.json (in the held-out evaluation) resumes into
    # that evaluation alone; a run with results.json at this step is finished.
    if step >= new.epochs * new.steps_per_epoch and os.path.isfile(os.path.join(run_dir, "results.json")):
        raise DamoError(f"--resume {run_dir}: the run already finished at step {step}; pass a larger --epochs "
                        f"(now {new.epochs}) to train it further")
    return ck, new


def load_dynamics(model: DynamicsEnsemble, path: str, obs_mean, obs_std, info: dict) -> dict:
    """Load a saved ensemble; it works in normalised coordinates, so it must come from the same data."""
    if not os.path.isfile(path):
        raise DamoError(f"--dynamics-path {path}: no such file; pass a run's dynamics.pt or checkpoint.pt")
    try:
        saved = torch.load(path, map_location=obs_mean.device, weights_only=False)
        state, mean, std = saved["dynamics"], saved["obs_mean"], saved["obs_std"]
    except Exception as e:
        raise DamoError(f"--dynamics-path {path}: cannot read a dynamics ensemble from it ({type(e).__name__}: {e}); "
                        f"pass a run's dynamics.pt or checkpoint.pt") from None
    trained_on = saved.get("data", {}).get("dataset_ids")
    if trained_on != info["dataset_ids"] or mean.shape != obs_mean.shape or not (
            torch.allclose(mean.to(obs_mean), obs_mean) and torch.allclose(std.to(obs_std), obs_std)):
        raise DamoError(f"--dynamics-path {path} was trained on {trained_on} (other data or normalisation); this run "
                        f"uses {info['dataset_ids']}. Pass an ensemble trained on this dataset, or drop the flag to "
                        f"train one")
    try:
        model.load_state_dict(state)
    except RuntimeError:  # same data but other sizes
        raise DamoError(f"--dynamics-path {path}: its ensemble has other sizes than this run's (--n-ensemble "
                        f"{model.n}, --dynamics-hidden {model.layers[0].weight.shape[-1]}); pass the flags it was "
                        f"trained with (its run's config.json)") from None
    return {**saved.get("info", {}), "source": os.path.abspath(path), "elites": model.elites.tolist()}


def save_json_atomic(obj, path: str):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def save_atomic(obj, path: str):
    """Write to a temporary file, then rename: a kill at any moment leaves the old or the new file.
    A failed write (disk full, read-only folder) removes the partial file and keeps the old one."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:  # a Python file, so a full disk raises OSError(ENOSPC), not a C++ error
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise DamoError(f"cannot write {path} ({e.strerror or e}); the previous {os.path.basename(path)} and the "
                        f"logs beside it are intact. Free disk space or fix permissions, then continue with "
                        f"--resume {os.path.dirname(path) or '.'}") from None


# ----------------------------------------------------------------------------------------------------
# --eval-only (and --capture-video)
# ----------------------------------------------------------------------------------------------------


def make_video_env(env_id: str, video_dir: str, prefix: str) -> gym.Env:
    """The eval env wrapped in Gymnasium's RecordVideo (first episode), after checking that MuJoCo can
    render offscreen here; if it cannot, say why and how to fix it instead of failing mid-evaluation."""
    if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
        os.environ["MUJOCO_GL"] = "egl"  # headless default (read when mujoco is first imported, just below)
    try:
        import moviepy  # noqa: F401  (RecordVideo encodes with it)
    except ImportError:
        raise DamoError("--capture-video needs moviepy: pip install moviepy") from None
    try:
        env = gym.make(env_id, render_mode="rgb_array")
        env.reset(seed=0)
        frame = env.render()
        if frame is None or frame.ndim != 3:
            raise RuntimeError(f"render() returned {type(frame).__name__}")
    except Exception as e:
        raise DamoError(
            f"--capture-video: MuJoCo cannot render offscreen here (MUJOCO_GL={os.environ.get('MUJOCO_GL')}): "
            f"{type(e).__name__}: {e}. Rendering needs an OpenGL backend: MUJOCO_GL=egl (a GPU driver or Mesa's "
            f"libEGL) or MUJOCO_GL=osmesa (apt install libosmesa6; pip install PyOpenGL). "
            f"Evaluation without --capture-video works without either.") from None
    return gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda k: k == 0, name_prefix=prefix)


def eval_only(args: Args, explicit: Optional[set] = None) -> dict:
    """Evaluate a saved policy in its dataset's real environment: raw returns and normalised score. The
    episodes start where the run's own evaluations did (its seed + 10000 + k), unless --seed is given."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    ag, ck = load_agent(args.eval_only)
    seed = args.seed if "seed" in (explicit or set()) else int(ck["args"]["seed"])
    path, env_id = ck["path"], ck["data"]["eval_env_id"]
    if args.heldout:
        return eval_heldout(args, ag, ck, seed)
    video_dir = os.path.join(os.path.dirname(os.path.abspath(path)), "videos")
    env = make_video_env(env_id, video_dir, f"step{ck['global_step']}") if args.capture_video else gym.make(env_id)
    envs = [env] + [gym.make(env_id) for _ in range(args.eval_episodes - 1)]  # the video shows episode 0
    rets = evaluate(ag.actor, envs, seed + 10_000, ck["obs_mean"], ck["obs_std"], "cpu", obs_noise=args.obs_noise)
    for e in envs:
        e.close()  # RecordVideo writes the MP4 here
    norm = normalized_score(rets, ck["data"])
    out = {"checkpoint": path, "global_step": ck["global_step"], "env": env_id, "seed": seed,
           "episodes": args.eval_episodes, "obs_noise": args.obs_noise, "return_mean": float(rets.mean()), "return_std": float(rets.std()),
           "normalized_score": float(norm.mean()), "score_reference": ck["data"]["ref_source"], "returns": rets.tolist()}
    if args.capture_video:
        out["video"] = os.path.join(video_dir, f"step{ck['global_step']}-episode-0.mp4")
        if not os.path.isfile(out["video"]):
            raise DamoError(f"--capture-video: no video was written to {video_dir} (moviepy/ffmpeg failed silently?)")
    print(f"{path} (step {ck['global_step']}): return {rets.mean():.1f} +- {rets.std():.1f} over {args.eval_episodes} "
          f"episodes in {out['env']}" + (f" with observation noise {args.obs_noise} std" if args.obs_noise else "")
          + f", normalised score {norm.mean():.1f} ({out['score_reference']})"
          + (f", video {out['video']}" if args.capture_video else ""), file=sys.stderr)
    print(json.dumps(out))
    return out


def eval_heldout(args: Args, ag: Agent, ck: dict, seed: int) -> dict:
    """--eval-only RUN --heldout: the saved policy on the held-out block; for a run's own checkpoint.pt the
    result is recorded in RUN/results.json ("heldout"), as a run that finishes records it."""
    out = {"checkpoint": ck["path"], "global_step": ck["global_step"], "env": ck["data"]["eval_env_id"], "seed": seed,
           **heldout_evaluation(ag.actor, ck["data"]["eval_env_id"], seed, args.heldout_episodes, ck["obs_mean"],
                                ck["obs_std"], ck["data"], "cpu")}
    results = os.path.join(os.path.dirname(os.path.abspath(ck["path"])), "results.json")
    if os.path.basename(ck["path"]) == "checkpoint.pt" and os.path.isfile(results):
        with open(results) as f:
            res = json.load(f)
        if res.get("global_steps") == ck["global_step"]:  # the results of this very policy
            res["heldout"] = {k: v for k, v in out.items() if k not in ("checkpoint", "env", "global_step")}
            res["heldout_normalized_score"] = out["normalized_score"]
            save_json_atomic(res, results)
            out["recorded_in"] = results
    print(f"{ck['path']} (step {ck['global_step']}): held-out score {out['normalized_score']:.1f} +- "
          f"{out['normalized_score_std']:.1f} over {out['episodes']} episodes (start seeds {out['seeds'][0]}..."
          f"{out['seeds'][1] - 1})" + (f", recorded in {results}" if "recorded_in" in out else ""), file=sys.stderr)
    print(json.dumps(out))
    return out


# ----------------------------------------------------------------------------------------------------
# --benchmark: time every phase on random data of the env's real shapes
# ----------------------------------------------------------------------------------------------------


def benchmark(args: Args) -> dict:
    """Median time of each phase over `benchmark_repeats` repeats after a warm-up, on random data with
    the env's real shapes. The SAC reference is the same update with alpha = beta = 0 on the same
    networks (no discriminator, no conservative term, no behaviour term): plain model-based SAC."""
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    family = args.env_id.split("-")[0] if "/" not in args.env_id else next((e for e in ENVS if f"/{e}/" in args.env_id), "")
    if family not in BENCH_ENVS:
        raise DamoError(f"--benchmark knows the shapes of {', '.join(BENCH_ENVS)}; got --env-id {args.env_id}")
    args = with_env_defaults(args, family)  # the update timed is the one this env's runs make
    # full-length episodes: the unhealthy-termination is switched off so every episode lasts 1000 steps
    envs = [gym.make(BENCH_ENVS[family], **({} if family == "halfcheetah" else {"terminate_when_unhealthy": False}))
            for _ in range(10)]
    obs_dim, act_dim = envs[0].observation_space.shape[0], envs[0].action_space.shape[0]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = 100_000
    D = {"obs": torch.randn(rows, obs_dim, device=device), "act": torch.rand(rows, act_dim, device=device) * 2 - 1,
         "rew": torch.randn(rows, device=device), "next_obs": torch.randn(rows, obs_dim, device=device),
         "done": torch.zeros(rows, device=device)}
    synthetic = SyntheticBuffer(rows, obs_dim, act_dim, device)
    synthetic.add(D)
    ag = make_agent(obs_dim, act_dim, args, device)
    ag_sac = make_agent(obs_dim, act_dim, args, device)
    sac_args = replace(args, alpha=0.0, beta=0.0)

    def rate(fn, n):  # calls per second, median over repeats after one warm-up repeat
        out = []
        for r in range(args.benchmark_repeats + 1):
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            out.append(n / (time.perf_counter() - t0))
        return float(np.median(out[1:]))

    def seconds(fn):
        return 1.0 / rate(fn, 1)

    n = 50 if device.type == "cpu" else 200
    res = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(), "env": BENCH_ENVS[family],
           "threads": torch.get_num_threads()}
    res["compile"] = args.compile
    if args.compile:  # the eager update in the same process first, for the gain of --compile
        ag_eager = make_agent(obs_dim, act_dim, args, device)
        res["damo_update_eager_steps_per_s"] = rate(lambda: damo_update(ag_eager, D, synthetic, args), n)
    compile_losses(args.compile)
    res["damo_update_steps_per_s"] = rate(lambda: damo_update(ag, D, synthetic, args), n)
    res["sac_update_steps_per_s"] = rate(lambda: damo_update(ag_sac, D, synthetic, sac_args), n)
    res["damo_to_sac_ratio"] = res["damo_update_steps_per_s"] / res["sac_update_steps_per_s"]
    X = torch.cat([D["obs"], D["act"]], -1)
    Y = torch.cat([D["next_obs"] - D["obs"], D["rew"][:, None]], -1)
    opt = torch.optim.Adam(ag.dynamics.parameters(), lr=args.dynamics_lr)
    E, bs = args.n_ensemble, args.dynamics_batch_size

    def dyn_step():
        j = torch.randint(rows, (E, bs), device=device)
        sgd_step(opt, dynamics_loss(ag.dynamics, X[j], Y[j])[0])

    res["dynamics_train_steps_per_s"] = rate(dyn_step, max(5, n // 2))
    res["dynamics_epoch_1M_s"] = math.ceil(1_000_000 / bs) / res["dynamics_train_steps_per_s"]
    start = D["obs"][:50_000]
    # worst case: no branch terminates, so every step runs all 50,000 rows
    res["rollout_50k_x5_s"] = seconds(lambda: model_rollout(ag.dynamics, ag.actor, start, 5, never_terminates,
                                                            torch.zeros(obs_dim, device=device),
                                                            torch.ones(obs_dim, device=device)))
    zeros, ones = torch.zeros(obs_dim, device=device), torch.ones(obs_dim, device=device)
    res["eval_10_episodes_s"] = seconds(lambda: evaluate(ag.actor, envs, 0, zeros, ones, device))
    # the same 10 episodes one at a time (the loop evaluate() replaced), timed in this run for comparison
    res["eval_10_episodes_sequential_s"] = seconds(
        lambda: [evaluate(ag.actor, envs[:1], k, zeros, ones, device) for k in range(10)])

    def physics_only():  # the floor of any evaluation: the simulator's 10 x 1000 steps, no policy
        for k, env in enumerate(envs):
            env.reset(seed=k)
        for _ in range(1000):
            for env in envs:
                env.step(np.zeros(act_dim))

    res["eval_10_episodes_env_only_s"] = seconds(physics_only)
    steps = args.epochs * args.steps_per_epoch
    res["projected_full_run_h"] = (steps / res["damo_update_steps_per_s"]
                                   + steps / args.rollout_freq * res["rollout_50k_x5_s"] * args.rollout_batch_size / 50_000
                                   + math.ceil(args.epochs / args.eval_every) * res["eval_10_episodes_s"]
                                   * args.eval_episodes / 10) / 3600
    return res


def print_benchmark(res: dict, path: str):
    rows = [("DAMO update", f"{res['damo_update_steps_per_s']:.0f} steps/s"),
            ("plain SAC update (same networks)", f"{res['sac_update_steps_per_s']:.0f} steps/s"),
            ("DAMO / SAC", f"{res['damo_to_sac_ratio']:.2f}"),
            *([("DAMO update without --compile", f"{res['damo_update_eager_steps_per_s']:.0f} steps/s")]
              if res["compile"] else []),
            ("dynamics training (7 x 256)", f"{res['dynamics_train_steps_per_s']:.0f} steps/s"),
            ("dynamics epoch over 1M transitions", f"{res['dynamics_epoch_1M_s']:.0f} s"),
            ("model rollout 50,000 x 5", f"{res['rollout_50k_x5_s']:.2f} s"),
            ("evaluation, 10 x 1000-step episodes in lockstep", f"{res['eval_10_episodes_s']:.2f} s"),
            ("the same, one episode at a time", f"{res['eval_10_episodes_sequential_s']:.2f} s"),
            ("the env's own 10 x 1000 steps (no policy)", f"{res['eval_10_episodes_env_only_s']:.2f} s"),
            ("projected policy phase of the configured run", f"{res['projected_full_run_h']:.1f} h")]
    print(f"| phase ({res['device']}, {res['threads']} torch threads{', --compile' if res['compile'] else ''}) "
          f"| figure |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res))


# ----------------------------------------------------------------------------------------------------
# --compile
# ----------------------------------------------------------------------------------------------------


def compile_losses(on: bool = True):
    """--compile: rebind this module's four loss functions to torch.compile'd versions of themselves, so
    that damo_update's calls by name run compiled (fused kernels, fewer Python ops; the same math,
    test_compiled_losses_equal_plain). on=False restores the plain functions."""
    g = globals()
    for name in ("discriminator_loss", "critic_loss", "actor_loss", "temperature_loss"):
        plain = getattr(g[name], "_torchdynamo_orig_callable", g[name])
        g[name] = torch.compile(plain) if on else plain


# ----------------------------------------------------------------------------------------------------
# Progress line, package versions
# ----------------------------------------------------------------------------------------------------


class Progress:
    """A one-line status on stderr, rewritten at most every `every` seconds (no tqdm in the hot loop)."""

    def __init__(self, every: float = 1.0):
        self.every, self.last = every, 0.0

    def __call__(self, text: str, force: bool = False):
        now = time.time()
        if force or now - self.last >= self.every:
            self.last = now
            end = "\n" if force else ""
            print(f"\r{text:<110}", end=end, file=sys.stderr, flush=True)


def time_left(t0: float, done: int, remaining: int) -> str:
    """Projected wall time of the remaining steps at the pace since t0 (updates, rollouts and evaluations)."""
    s = (time.time() - t0) / max(done, 1) * remaining
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


def package_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for p in ("torch", "numpy", "gymnasium", "mujoco", "minari"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def cli(argv: list[str]) -> int:
    """The command line: parse the flags, run (or --eval-only / --benchmark), and turn a DamoError into one
    `error:` message and exit status 2. sweep.py calls it for each run of a sweep."""
    import tyro

    try:
        args = tyro.cli(Args, args=argv)
        check_args(args)
        if args.eval_only:
            eval_only(args, explicit_flags(argv))
        elif args.benchmark:
            result = benchmark(args)
            print_benchmark(result, os.path.join(args.runs_dir, f"benchmark_{'cuda' if 'cpu' not in result['device'] else 'cpu'}.json"))
        else:
            main(args, explicit_flags(argv))
    except DamoError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: eval.csv and the last checkpoint in the run folder are kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
