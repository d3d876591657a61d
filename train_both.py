"""Reward model, then PPO against it, in one launch: OpenAI's lm-human-preferences pipeline end to end.

    python train_both.py                                               # the embedded world on a CPU, under 10 minutes
    python train_both.py --seed 2 --policy.kl_target 2                 # --reward.* and --policy.* reach each stage
    accelerate launch --num_processes 8 train_both.py sentiment        # OAI's sentiment run (gpt2, BookCorpus, hub labels)

The run folder runs/<exp_name>__<seed>__<unix time>/ holds reward/ (train_reward.py's run, with reward_model/) and
policy/ (train_policy.py's run, which loads that reward model). As OAI's train_policy with rewards.train_new_model,
both stages must share the task: base model, query and response lengths, query data and temperature.
A first positional word picks a preset for both stages: `sentiment`, `descriptiveness` (OAI), `tldr` (SFD's 1B recipe on
the hub data, after `train_sft.py tldr`), `tldr_twin` (the offline summarization twin, after `train_sft.py tldr_twin`).
"""

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
from accelerate import PartialState

import train_policy
import train_reward


@dataclass
class Args:
    exp_name: str = "both"
    """name of the experiment; the run folder is runs/<exp_name>__<seed>__<unix time>"""
    seed: Optional[int] = None
    """seed of both stages (sets --reward.seed and --policy.seed); None leaves each its own"""
    track: bool = False
    """log both stages to Weights & Biases (same as --reward.track --policy.track)"""
    run_root: str = "runs"
    """folder that holds the run folders"""
    reward: train_reward.Args = field(default_factory=train_reward.Args)
    """the reward model stage (train_reward.py's flags)"""
    policy: train_policy.Args = field(default_factory=train_policy.Args)
    """the PPO stage (train_policy.py's flags); --policy.reward_model is filled in with the stage's own reward model"""


PRESETS = {
    name: dict(exp_name=name, reward=replace(train_reward.Args(), **train_reward.PRESETS[name]),
               policy=replace(train_policy.Args(), **train_policy.PRESETS[name]))
    for name in ("sentiment", "descriptiveness", "tldr", "tldr_twin")
}
# What both stages must agree on. Not response_length: a reward model may read longer responses than the policy samples
# (SFD: comparisons of up to 169 tokens, PPO samples of 53).
SHARED_TASK = ("base_model", "query_length", "query_dataset", "query_split", "temperature")


def train(args: Args) -> Path:
    for name in SHARED_TASK:  # {OAI}/lm_human_preferences/train_policy.py#L410-L411
        if getattr(args.reward, name) != getattr(args.policy, name):
            train_policy.fail(f"--reward.{name} {getattr(args.reward, name)} and --policy.{name} {getattr(args.policy, name)} differ: both stages share one task")
    if args.policy.reward_model is not None:
        train_policy.fail("--policy.reward_model is set by train_both.py (use train_policy.py to start from an existing reward model)")
    seeds = {} if args.seed is None else {"seed": args.seed}
    tracks = {"track": True} if args.track else {}
    reward_args = replace(args.reward, **seeds, **tracks)
    policy_args = replace(args.policy, **seeds, **tracks)

    # one folder name on every process: accelerate's process group exists once PartialState is made
    state = PartialState(cpu=not torch.cuda.is_available())
    run_dir = train_policy.shared_run_dir(state, args.run_root, args.exp_name, policy_args.seed)
    train_reward.train(reward_args, run_dir / "reward")
    policy_args = replace(policy_args, reward_model=str(run_dir / "reward" / "reward_model"))
    train_policy.train(policy_args, run_dir / "policy")
    return run_dir


if __name__ == "__main__":
    train(train_policy.cli(Args, PRESETS, __doc__))
