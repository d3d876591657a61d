"""What the TRL wrappers share (trl_ppo.py under TRL 1.12; trl_critic_free.py, trl_dpo.py and trl_reward.py under 1.16):
our reward model as TRL reads one, and the result.json that side_by_side.py and side_by_side_trl116.py read. It imports
no trl, so both environments run it. Peak memory is not measured here: the harness reads each child's from /proc."""

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification


def reward_model_for_trl(folder: str):
    """Our reward model folder (backbone + reward_head.safetensors) as a sequence-classification model whose `score`
    layer is Linear(d, 1) with gain * w and gain * b + bias, so TRL reads the same reward at the same (last non-pad)
    token."""
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
    head = load_file(f"{folder}/reward_head.safetensors")
    score = torch.nn.Linear(head["head.weight"].shape[1], 1)
    with torch.no_grad():
        score.weight.copy_(head["gain"] * head["head.weight"])
        score.bias.copy_(head["gain"] * head["head.bias"] + head["bias"])
    model.score = score
    return model.eval()


def write_result(output_dir: str, result: dict):
    """<output_dir>/result.json, and the same line on stdout."""
    with open(f"{output_dir}/result.json", "w") as f:
        json.dump(result, f)
    print(json.dumps(result))
