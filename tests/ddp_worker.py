"""Run by the tests under `torchrun --nproc_per_node 2`: train, then dump this rank's weights.

Always on CPU (gloo): on a one-GPU host both ranks would otherwise claim CUDA devices 0 and 1
("invalid device ordinal"). Hidden before torch is imported.
"""

import os
import sys

os.environ["CUDA_VISIBLE_DEVICES"] = ""
from pathlib import Path

from safetensors.torch import save_file

from leapalign_fast.config import load_config
from leapalign_fast.train import train, trained_state

if __name__ == "__main__":
    cfg = load_config(None, sys.argv[1:])
    result = train(cfg)
    rank = result.run.accelerator.process_index
    if cfg.fsdp:  # the process group is gone with the run; the FSDP tests read the checkpoints and exports
        sys.exit(0)
    weights = {k: v.cpu().contiguous() for k, v in trained_state(result.run.transformer).items()}
    save_file(weights, str(Path(cfg.output_dir) / f"final_rank{rank}.safetensors"))
