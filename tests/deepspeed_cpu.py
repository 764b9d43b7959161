"""Test-only harness: run Lightning's real ``DeepSpeedStrategy`` on CPU (gloo, N processes).

Lightning refuses ``DeepSpeedStrategy`` without CUDA. This subclass removes the three CUDA-only
assumptions so tests can exercise real ZeRO-1/2/3 (fp32 and bf16) on a CPU-only CI machine. It lives in
``tests/`` on purpose: it must never ship in the product.

Usage::

    from deepspeed_cpu import CPUDeepSpeedStrategy, cpu_deepspeed_env  # tests/ on sys.path

    cpu_deepspeed_env()  # before the Trainer is built
    trainer = Trainer(accelerator="cpu", devices=2, strategy=CPUDeepSpeedStrategy(stage=3),
                      precision="bf16-mixed", max_steps=3)

Other things a test needs (see ``cpu_deepspeed_env``):

- ``configure_optimizers`` should return a plain ``torch.optim`` optimizer (e.g. ``AdamW``). DeepSpeed's
  ``FusedAdam`` / ``DeepSpeedCPUAdam`` would be JIT-compiled (tens of seconds, needs a C++ toolchain).
  ``zero_allow_untested_optimizer`` (Lightning's default ``True``) lets ZeRO accept it. (Not verified here:
  with ``offload_optimizer=True`` DeepSpeed also wants ``"zero_force_ds_cpu_optimizer": False``.)
- fp16 (``16-mixed``) does not work on CPU; use ``32-true`` or ``bf16-mixed``.
- One thread per process (``OMP_NUM_THREADS=1`` / ``torch.set_num_threads(1)``): two ranks on a 2-core
  box otherwise oversubscribe and gloo collectives crawl.
- DeepSpeed's first start JIT-compiles ``deepspeed_shm_comm`` (~30 s); ``build_shm_comm = False`` skips it.
- Lightning launches ranks > 0 by re-running ``sys.argv`` (subprocess script launcher), so the entry
  point must be a runnable script, not an interactive/pytest-collected function. In pytest, run the
  training in a ``subprocess`` of a script like ``tests/scripts/train_run.py``.
"""

from __future__ import annotations

import importlib
import os
import socket

# DeepSpeed picks its accelerator once, at import time. Force the CPU accelerator before anything imports
# deepspeed, so that on a machine that *does* have a GPU the test still runs (and stays) on CPU.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from lightning.fabric.utilities.seed import reset_seed  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy  # noqa: E402
from typing_extensions import override  # noqa: E402

__all__ = ["CPUDeepSpeedStrategy", "cpu_deepspeed_env", "free_port"]


def free_port() -> int:
    """Return a TCP port that is free right now (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_deepspeed_env(threads: int = 1) -> None:
    """Set the process-wide knobs a CPU DeepSpeed run needs. Call before building the ``Trainer``.

    The values are exported through ``os.environ`` so the rank processes that Lightning re-launches inherit
    them. ``MASTER_PORT`` is only chosen in the launching (rank 0) process; a fixed port would collide when
    pytest-xdist runs several DeepSpeed tests at once.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "LOCAL_RANK" not in os.environ:  # launcher process: children inherit the port through the env
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    torch.set_num_threads(threads)


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` that runs on CPU with the gloo backend. For tests only."""

    strategy_name = "deepspeed_cpu"

    #: DeepSpeed's CPU comm backend JIT-compiles a shared-memory all-reduce op (``deepspeed_shm_comm``,
    #: ~30 s with a C++ toolchain, cached in ``~/.cache/torch_extensions``) the first time it starts. Training
    #: never needs it (it only serves ``inference_all_reduce``; gloo does the rest), so skip it by default.
    build_shm_comm: bool = False

    @override
    def setup_environment(self) -> None:
        # DeepSpeedStrategy.setup_environment raises unless the accelerator is CUDAAccelerator. Skip that
        # check and do what it would do next (DDP's: set up accelerator, launch env, distributed init).
        DDPStrategy.setup_environment(self)

    @override
    def setup_distributed(self) -> None:
        # Same as the parent minus `_validate_device_index_selection`, which rejects CPU devices because
        # they carry no index. `_init_deepspeed_distributed` picks gloo from `root_device.type == "cpu"`.
        if not self.build_shm_comm:
            # `import deepspeed.comm.torch as m` would bind the *torch* package (re-exported by
            # `deepspeed.comm`), so take the submodule itself.
            ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
            ds_torch_comm.build_shm_op = lambda: None  # read as a module global by TorchBackend.__init__
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    @override
    def root_device(self) -> torch.device:
        # Lightning's CPU parallel_devices are all `cpu` without an index, but DeepSpeed reads
        # `root_device.index` as its `device_rank` and needs an int. Give each rank its local rank.
        return torch.device("cpu", self.local_rank)
