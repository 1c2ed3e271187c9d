"""Build a real Minari dataset locally by rolling a behaviour policy in the real MuJoCo environment.

Why this file exists: Minari's hosted MuJoCo datasets need a network. To test and benchmark damo.py
without one, we roll the carried behaviour policies (`assets/policies/`: Hopper-v5, HalfCheetah-v5 and
Walker2d-v5 SAC policies trained online in the real environments; docs/data.md) and write the episodes with
Minari's own API (`create_dataset_from_buffers`, no jax needed), under `MINARI_DATASETS_PATH`, named
like the hosted ids. damo.py then loads them with exactly the code it uses for downloaded data.

    MINARI_DATASETS_PATH=$PWD/data python make_dataset.py --policy assets/policies/hopper-medium.npz \
        --dataset-id mujoco/hopper/medium-v0 --steps 100000 --seed 0

A replay-like dataset (in the spirit of D4RL's medium-replay: what a training run saw on its way to
the medium policy) is a mix of sources, each rolled for its own number of steps, in the order given:
`random` (uniform random actions, like a replay buffer's warm-up) or a policy file.

    python make_dataset.py --env-id HalfCheetah-v5 --dataset-id mujoco/halfcheetah/medium-replay-v0 \
        --mix random:20000 assets/policies/halfcheetah-sac-20k.npz:60000 ...

Like Minari's generation scripts, actions are *sampled* from the policy (not its mean) unless
`--deterministic` is given; that choice changes the data's return and coverage, so it is recorded
in the dataset's description. `--action-noise SIGMA` makes noisy behaviour data (the paper's noisy
setting): Gaussian noise on every action, clipped to the bounds, executed and recorded; SIGMA is kept
in the dataset's metadata (`action_noise`), and damo.py copies it into each run's config.json.

A policy file is a numpy .npz of float arrays W1 [obs, 256], b1, W2 [256, 256], b2, Wmu [256, act],
bmu, Wls [256, act], bls (a 256-256 ReLU tanh-Gaussian MLP on the raw observation):
h = relu(relu(obs @ W1 + b1) @ W2 + b2); mean action tanh(h @ Wmu + bmu); log-std
-5 + 3.5 * (tanh(h @ Wls + bls) + 1), in [-5, 2]; a sampled action is tanh(mu + exp(log_std) * noise).
"""

from __future__ import annotations

import os
import re
import time
import warnings
from dataclasses import dataclass

import gymnasium as gym
import numpy as np


@dataclass
class Args:
    policy: str = "assets/policies/hopper-medium.npz"
    """behaviour policy weights (.npz with W1,b1,W2,b2,Wmu,bmu,Wls,bls; layout in this file's docstring)"""
    dataset_id: str = "mujoco/hopper/medium-v0"
    """Minari id to write under MINARI_DATASETS_PATH (named like the hosted one)"""
    env_id: str = "Hopper-v5"
    """Gymnasium environment the policy is rolled in"""
    steps: int = 100_000
    """number of environment steps (the last episode is cut at this many, truncated)"""
    seed: int = 0
    """seed of the first episode's reset and of the action noise (episode k resets with seed + k)"""
    deterministic: bool = False
    """use the policy's mean action tanh(mu) instead of a sample (Minari samples)"""
    overwrite: bool = False
    """delete an existing dataset of the same id first"""
    mix: tuple[str, ...] = ()
    """SOURCE:STEPS items rolled one after the other into one dataset (SOURCE: a policy .npz or `random`);
    replaces --policy/--steps"""
    action_noise: float = 0.0
    """std of Gaussian noise added to every behaviour action, which is then clipped to the action bounds,
    executed and recorded (noisy behaviour data); stored in the dataset's metadata as `action_noise`"""


class RandomPolicy:
    """Uniform random actions in the env's action box (a replay buffer's warm-up steps)."""

    def __init__(self, space: gym.spaces.Box, rng: np.random.Generator):
        self.space, self.rng = space, rng

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return self.rng.uniform(self.space.low, self.space.high)


class NoisyPolicy:
    """Noisy data: the behaviour's action plus N(0, sigma^2) per coordinate, clipped to the action box.
    The noisy action is the one the env executes and the dataset records, so the data stay real
    transitions of the real env; only the behaviour policy that made them is noisier."""

    def __init__(self, policy, sigma: float, space: gym.spaces.Box, rng: np.random.Generator):
        self.policy, self.sigma, self.space, self.rng = policy, sigma, space, rng

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        a = self.policy(obs)
        return np.clip(a + self.sigma * self.rng.standard_normal(a.shape), self.space.low, self.space.high)


class InputError(Exception):
    """A bad flag or file, found before any rollout: printed as one `error:` line, exit status 2."""


POLICY_KEYS = ("W1", "b1", "W2", "b2", "Wmu", "bmu", "Wls", "bls")


def load_policy_weights(path: str, env: gym.Env) -> dict:
    """A behaviour policy's weights, checked against the env it will be rolled in."""
    if not os.path.isfile(path):
        raise InputError(f"policy file {path} does not exist; the carried ones are in assets/policies/")
    try:
        with np.load(path) as w:
            p = {k: w[k].astype(np.float64) for k in w.files}
    except Exception as e:
        raise InputError(f"policy file {path} is not a .npz of weights ({type(e).__name__}); expected the keys "
                         f"{', '.join(POLICY_KEYS)} (layout: make_dataset.py's docstring)") from None
    missing = [k for k in POLICY_KEYS if k not in p]
    if missing:
        raise InputError(f"policy file {path} lacks {', '.join(missing)}; expected {', '.join(POLICY_KEYS)}")
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    if p["W1"].shape[0] != obs_dim or p["Wmu"].shape[1] != act_dim:
        raise InputError(f"policy file {path} maps {p['W1'].shape[0]}-d observations to {p['Wmu'].shape[1]}-d actions; "
                         f"{env.spec.id} has {obs_dim} and {act_dim}. Pass the --env-id the policy was trained in")
    return p


class NumpyPolicy:
    """The behaviour policies' tanh-Gaussian MLP (256-256 ReLU), evaluated with numpy."""

    def __init__(self, weights: dict, deterministic: bool, rng: np.random.Generator):
        self.p, self.deterministic, self.rng = weights, deterministic, rng

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        p = self.p
        h = np.maximum(np.maximum(obs @ p["W1"] + p["b1"], 0) @ p["W2"] + p["b2"], 0)
        mu = h @ p["Wmu"] + p["bmu"]
        if self.deterministic:
            return np.tanh(mu)
        log_std = -5 + 3.5 * (np.tanh(h @ p["Wls"] + p["bls"]) + 1)  # in [-5, 2]
        return np.tanh(mu + np.exp(log_std) * self.rng.standard_normal(mu.shape))


def rollout_episodes(env: gym.Env, policy, steps: int, seed: int, first_id: int = 0):
    """Roll `policy` for `steps` env steps; return Minari EpisodeBuffers and the episode returns.
    Episode k resets with seed + k and gets id first_id + k."""
    from minari.data_collector import EpisodeBuffer

    buffers, returns, total, k = [], [], 0, 0
    while total < steps:
        obs, _ = env.reset(seed=seed + k)
        observations, actions, rewards, terms, truncs = [obs], [], [], [], []
        while True:
            act = policy(obs).astype(np.float32)
            obs, rew, term, trunc, _ = env.step(act)
            total += 1
            trunc = trunc or total >= steps  # the step budget ends an episode like a time limit
            observations.append(obs), actions.append(act), rewards.append(rew)
            terms.append(term), truncs.append(trunc)
            if term or trunc:
                break
        buffers.append(
            EpisodeBuffer(
                id=first_id + k, seed=seed + k,
                observations=np.asarray(observations, dtype=np.float64),  # [T+1, obs_dim]
                actions=np.asarray(actions, dtype=np.float32),  # [T, act_dim]
                rewards=np.asarray(rewards, dtype=np.float64),
                terminations=np.asarray(terms, dtype=bool),
                truncations=np.asarray(truncs, dtype=bool),
            )
        )
        returns.append(float(np.sum(rewards)))
        k += 1
    return buffers, np.asarray(returns)


def check_inputs(args: Args) -> tuple[gym.Env, list]:
    """Everything that can be wrong with the flags, before any rollout and before anything is written:
    the env id, the dataset id's form, an existing dataset, the step counts, each policy against the env.
    Returns the env and the sources [(name, weights or None for random, steps)]."""
    import minari

    if not re.fullmatch(r"[\w-]+(/[\w-]+)*-v\d+", args.dataset_id):  # Minari's own rule: no dots
        raise InputError(f"--dataset-id '{args.dataset_id}' is not a Minari id; expected namespace/name-vN of letters, "
                         f"digits, - and _, e.g. mujoco/hopper/medium-v0 (damo.py's short id hopper-medium finds that "
                         f"one) or mujoco/hopper/medium-noise3-v0")
    root = minari.storage.get_dataset_path()
    if os.path.exists(os.path.join(root, args.dataset_id)) and not args.overwrite:
        raise InputError(f"dataset {args.dataset_id} already exists under {root}; pass --overwrite to replace it, or "
                         f"another --dataset-id")
    try:
        env = gym.make(args.env_id)
    except gym.error.Error as e:
        raise InputError(f"--env-id {args.env_id}: {e} (the carried policies are for Hopper-v5, HalfCheetah-v5 "
                         f"and Walker2d-v5)") from None
    sources = parse_mix(args.mix) if args.mix else [(args.policy, args.steps)]
    if not args.mix and args.steps < 1:
        raise InputError(f"--steps {args.steps}: a dataset needs at least 1 step")
    if not (np.isfinite(args.action_noise) and args.action_noise >= 0):
        raise InputError(f"--action-noise {args.action_noise}: the noise's std must be >= 0 (0: no noise), e.g. 0.1")
    return env, [(s, None if s == "random" else load_policy_weights(s, env), n) for s, n in sources]


def make_dataset(args: Args):
    import minari

    env, sources = check_inputs(args)
    if args.overwrite:
        try:
            minari.delete_dataset(args.dataset_id)
        except (FileNotFoundError, ValueError):
            pass
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    buffers, returns, parts = [], [], []
    for i, (source, weights, steps) in enumerate(sources):
        policy = RandomPolicy(env.action_space, rng) if weights is None else NumpyPolicy(weights, args.deterministic, rng)
        if args.action_noise > 0:
            policy = NoisyPolicy(policy, args.action_noise, env.action_space, rng)
        # each source's episodes get seeds of their own (1000 apart), so that no two sources share a reset
        b, r = rollout_episodes(env, policy, steps, args.seed + 1000 * i, first_id=len(buffers))
        buffers, returns = buffers + b, returns + r.tolist()
        parts.append(f"{steps} steps of {os.path.basename(source)} (return {r.mean():.1f} +- {r.std():.1f}, {len(r)} episodes)")
        if len(sources) > 1:
            print(parts[-1])
    returns = np.asarray(returns)
    mode = "mean action tanh(mu)" if args.deterministic else "sampled actions"
    if args.action_noise > 0:
        mode += f" + N(0, {args.action_noise}^2) noise, clipped"
    with warnings.catch_warnings():  # Minari recommends an e-mail, a code link and an eval env: none apply here
        warnings.filterwarnings("ignore", message=r"`(author_email|code_permalink|eval_env)` is set to None")
        dataset = minari.create_dataset_from_buffers(
            dataset_id=args.dataset_id,
            buffer=buffers,
            env=args.env_id,
            algorithm_name="SAC behaviour policy (damo make_dataset.py)",
            author="damo",
            description=f"{'; '.join(parts)} in {args.env_id}, {mode}, seed {args.seed}. "
            "Made locally by damo's make_dataset.py; not the hosted Minari dataset.",
        )
    dataset.storage.update_metadata({"action_noise": float(args.action_noise)})  # damo.py records it per run
    print(
        f"wrote {args.dataset_id}: {dataset.total_steps} steps, {dataset.total_episodes} episodes, "
        f"return {returns.mean():.1f} +- {returns.std():.1f} ({mode}), {time.time() - t0:.0f}s, "
        f"under {minari.storage.get_dataset_path()}"
    )
    return dataset, returns


def parse_mix(items) -> list[tuple[str, int]]:
    sources = []
    for item in items:
        source, _, steps = item.rpartition(":")
        if not source or not steps.isdigit() or int(steps) < 1:
            raise InputError(f"--mix item '{item}' is not SOURCE:STEPS with STEPS >= 1 (e.g. random:20000 or "
                             f"policy.npz:60000)")
        if source != "random" and not os.path.isfile(source):
            raise InputError(f"--mix item '{item}': no policy file {source}")
        sources.append((source, int(steps)))
    return sources


if __name__ == "__main__":
    import sys

    import tyro

    try:
        make_dataset(tyro.cli(Args))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
