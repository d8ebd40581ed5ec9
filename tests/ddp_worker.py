"""Run by the tests under `torchrun --nproc_per_node 2` (or as one of several ranks started by the test): train,
then dump this rank's weights. `--dump-resumed FILE`: only build the run and resume it, then write the gathered
trained weights, EMA and optimizer state (what a resharded resume loaded) to FILE.

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


def dump_resumed(cfg, path: Path) -> None:
    """Build the run, resume it (at this world size) and write the gathered state it loaded (rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from leapalign_fast.fsdp import full_tensors
    from leapalign_fast.train import Trainer, unwrap

    run = Trainer(cfg)
    acc = run.accelerator
    run.resume()
    out = {f"trained.{n}": t for n, t in full_tensors(trained_state(run.transformer)).items()}
    if run.ema is not None:
        out.update({f"ema.{n}": t for n, t in full_tensors(run.ema.shadow).items()})
    optim = get_optimizer_state_dict(
        unwrap(run.transformer), run.optimizer, options=StateDictOptions(full_state_dict=True)
    )
    for fqn, per_param in optim["state"].items():
        out.update({f"optimizer.state.{fqn}.{k}": v for k, v in per_param.items()})
    if acc.is_main_process:
        save_file({k: v.detach().cpu().contiguous() for k, v in out.items()}, str(path))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--dump-resumed"]:
        dump_resumed(load_config(None, args[2:]), Path(args[1]))
        sys.exit(0)
    cfg = load_config(None, args)
    result = train(cfg)
    if cfg.fsdp:  # the process group is gone with the run; the FSDP tests read the checkpoints and exports
        sys.exit(0)
    rank = result.trainer.accelerator.process_index
    weights = {k: v.cpu().contiguous() for k, v in trained_state(result.trainer.transformer).items()}
    save_file(weights, str(Path(cfg.output_dir) / f"final_rank{rank}.safetensors"))
