"""Reward model, then PPO against it, in one launch: OpenAI's lm-human-preferences pipeline end to end.

    python train_both.py                                         # the embedded world on a CPU, under 10 minutes
    python train_both.py --seed 2 --policy.kl_target 2           # --reward.* and --policy.* reach each stage
    accelerate launch --num_processes 8 train_both.py sentiment  # OAI's sentiment run (gpt2, BookCorpus, hub labels)

The run folder runs/<exp_name>__<seed>__<unix time>/ holds reward/ (train_reward.py's run, with reward_model/) and
policy/ (train_policy.py's run, which loads that reward model). As OAI's train_policy with rewards.train_new_model, both
stages must share the task: base model, query length, query data and temperature (not the response length: a reward
model may read longer responses than the policy samples, as SFD's does). Every flag of both stages is checked before
the reward model starts training. A first positional word
picks a preset for both stages: `sentiment`, `descriptiveness` (OAI), `tldr` (SFD's 1B recipe on the hub data, after
`train_sft.py tldr`), `tldr_twin` (the offline summarization twin, after `train_sft.py tldr_twin`).
"""

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

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
    resume: Optional[str] = None
    """run folder of a stopped train_both.py run: a finished stage is kept, the stage it stopped in continues from its
    last checkpoint, with the arguments the run started with (its args.json); no other flag"""


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
            train_policy.fail(f"--reward.{name} {getattr(args.reward, name)} and --policy.{name} "
                              f"{getattr(args.policy, name)} differ: "
                              "both stages share one task")
    if args.policy.reward_model is not None:
        train_policy.fail("--policy.reward_model is set by train_both.py (use train_policy.py to start from an "
                          "existing reward model)")
    if args.reward.resume or args.policy.resume:
        train_policy.fail("--reward.resume and --policy.resume are set by train_both.py: use --resume <run folder>")
    state = train_policy.start_processes()  # accelerate's process group (gloo on a CPU), before the world size is asked
    shared = {"run_root": args.run_root, **({} if args.seed is None else {"seed": args.seed}),
              **({"track": True} if args.track else {})}
    stages = {"reward": (train_reward, replace(args.reward, **shared)),
              "policy": (train_policy, replace(args.policy, **shared))}

    # Both stages' arguments are checked before either starts, and messages name the flags as typed here (--policy.*).
    # Then the run folder, made exclusively (one per run); the PPO stage reads the reward stage's model from it.
    train_reward.FLAG_PREFIX, train_policy.FLAG_PREFIX = "--reward.", "--policy."
    try:
        train_reward.check_args(stages["reward"][1])
        train_policy.check_args(stages["policy"][1], reward_model_follows=True)
        folder_seed = args.policy.seed if args.seed is None else args.seed
        run_dir = Path(args.resume) if args.resume else train_policy.shared_run_dir(state, args.run_root, args.exp_name,
                                                                                    folder_seed)
        reward_model = str(run_dir / "reward" / "reward_model")
        stages["policy"] = (train_policy, replace(stages["policy"][1], reward_model=reward_model))
        if state.is_main_process and not args.resume:
            (run_dir / "args.json").write_text(json.dumps({**asdict(args), "world_size": state.num_processes},
                                                          indent=2))
        for name, (script, stage_args) in stages.items():  # a resumed run continues each stage that has begun
            folder = run_dir / name
            resume = str(folder) if args.resume and (folder / "args.json").is_file() else None
            script.train(replace(stage_args, resume=resume), folder, f"python train_both.py --resume {run_dir}")
    finally:
        train_reward.FLAG_PREFIX = train_policy.FLAG_PREFIX = "--"
    if state.is_main_process:
        summaries = {name: json.loads((run_dir / name / "summary.json").read_text()) for name in stages}
        summary = {f"{name}/{k}": v for name, figures in summaries.items() for k, v in figures.items()}
        summary["wall_s"] = summaries["reward"]["wall_s"] + summaries["policy"]["wall_s"]
        train_policy.write_summary(run_dir, summary, f"reward model and PPO: {run_dir}")
    return run_dir


if __name__ == "__main__":
    train(train_policy.cli(Args, PRESETS, __doc__))
