"""Several runs of the scripts, one after the other, in the processes of one launch:

    torchrun --nproc_per_node 2 tests/launch_several.py RUNS
    accelerate launch --config_file configs/zero2.yaml --num_processes 2 tests/launch_several.py RUNS

RUNS is a JSON list of [script, [flags]]; each run is what `python <script> <flags>` would do under that launch
(tests/conftest.py: launch_several). The tests start torch, transformers and DeepSpeed once per launch this way instead
of once per run."""

import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":
    for script, flags in json.loads(sys.argv[1]):
        module = importlib.import_module(script.removesuffix(".py"))
        cli = module.train_policy.cli if script == "train_both.py" else module.cli  # as each script's __main__
        sys.argv = [script, *flags]
        module.train(cli(module.Args, module.PRESETS, module.__doc__))
