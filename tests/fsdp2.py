"""Run a script (train.py) with Accelerate's state set to FSDP2, as `accelerate launch` with
`distributed_type: FSDP` and `fsdp_version: 2` sets it on GPUs; nothing in embedrag reads this.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp2.py train.py [flags]

Accelerate keeps FSDP off for CPU processes (MULTI_CPU); torch's FSDP2 (`fully_shard`) runs on
them over gloo, and so does Accelerate's FSDP2 `prepare` once its state says FSDP. Under
`accelerate launch --config_file configs/accelerate/fsdp2.yaml tests/fsdp2.py train.py ...` the
plugin is read from the config (its FSDP_* variables); otherwise it is what that config gives:
one FSDP unit per transformer block, found from the model's `_no_split_modules`.
"""

from __future__ import annotations

import os
import runpy
import sys


def install() -> None:
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    real = AcceleratorState.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if os.environ.get("ACCELERATE_USE_FSDP") == "true":  # a config's settings
                self.fsdp_plugin = FullyShardedDataParallelPlugin()
            else:
                self.fsdp_plugin = FullyShardedDataParallelPlugin(
                    fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                    reshard_after_forward=True, state_dict_type="FULL_STATE_DICT")
            if self._mixed_precision != "no":  # as the state does for a launched FSDP run
                self.fsdp_plugin.set_mixed_precision(self._mixed_precision)

    AcceleratorState.__init__ = init


if __name__ == "__main__":
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    install()
    runpy.run_path(script, run_name="__main__")
