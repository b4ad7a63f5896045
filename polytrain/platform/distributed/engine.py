"""DeepSpeed ZeRO behind one small interface, driven through ``accelerate.Accelerator``'s DeepSpeed plugin.

The same code path serves one process (no launcher: a world of one is set up
here) and N processes started by ``torchrun`` / ``accelerate launch`` /
``deepspeed``.  On a machine without CUDA the process group is gloo.
"""

import hashlib
import os
import socket
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from polytrain.config.engine import EngineConfig
from polytrain.platform.distributed.checkpoint import (
    UNIVERSAL_INFO,
    Writes,
    restricted,
    safe_unpickling,
    tensor_bytes,
)
from polytrain.platform.observe.run_dir import SHARD_TAG

SINGLE_PROCESS_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                      "MASTER_ADDR": "127.0.0.1"}


class Engine:
    """Process group, device, DeepSpeed engine; everything distributed the trainer needs."""

    def __init__(self, cfg: EngineConfig, micro_batch_size: int, grad_accum: int, grad_clip: float,
                 load_universal: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        if "WORLD_SIZE" not in os.environ:
            os.environ.update(SINGLE_PROCESS_ENV, MASTER_PORT=str(free_port()))
        backend = cfg.dist_backend if cfg.dist_backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
        join_restarted_group(backend)
        ds_config = deepspeed_config(cfg, micro_batch_size, grad_accum, grad_clip, load_universal)
        # The LR schedule counts optimizer steps of the whole job; Accelerate would otherwise step it
        # once per process per step.
        self.accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config),
                                       gradient_accumulation_steps=grad_accum, step_scheduler_with_optimizer=False,
                                       kwargs_handlers=[InitProcessGroupKwargs(backend=backend)])
        self.cfg, self.grad_clip = cfg, grad_clip
        self.model: nn.Module | None = None

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler):
        """Wrap for DeepSpeed; returns (engine model, optimizer, scheduler).

        Pass a ``torch.optim.AdamW``: with optimizer offload Accelerate replaces it by DeepSpeed's
        CPU Adam in AdamW mode (an optimizer of any other class comes back as plain Adam with
        L2-coupled weight decay).
        """
        model, optimizer, scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        model.checkpoint_engine = safe_checkpoint_engine(model)
        self.model = model
        if steps_unchecked(self.cfg):
            guard_step(base_optimizer(optimizer), self.grad_clip)
        return model, optimizer, scheduler

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)

    @contextmanager
    def accumulate(self, model: nn.Module):
        """Around each micro-batch: marks which backward ends an accumulation window."""
        with self.accelerator.accumulate(model):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backward; at an accumulation boundary DeepSpeed also clips and steps the optimizer.

        DeepSpeed divides the loss by the accumulation steps and averages gradients over ranks.
        """
        self.accelerator.backward(loss)

    @property
    def loss_scaling(self) -> bool:
        """fp16: the loss is scaled, and a step whose scaled gradients overflow is skipped as a matter of course."""
        return self.cfg.precision == "fp16"

    def skipped_steps(self) -> int:
        """Optimizer steps skipped so far because the gradients were not finite: fp16 overflows, and in every
        precision a step whose global gradient norm is not finite (DeepSpeed's optimizers refuse it; ``guard_step``
        where DeepSpeed steps a torch optimizer as it is)."""
        return int(self.model.skipped_steps)

    def grad_norm(self) -> float | None:
        """Global gradient norm (before clipping) of the last optimizer step."""
        norm = self.model.get_global_grad_norm()
        return None if norm is None else float(norm)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of a float64 tensor over all ranks."""
        return self.accelerator.reduce(values.to(self.device, torch.float64), reduction="sum").cpu()

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    @contextmanager
    def main_process_first(self):
        with self.accelerator.main_process_first():
            yield

    def broadcast(self, value):
        """``value`` as the main process has it, on every rank."""
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]

    def replica_digests(self, model: nn.Module) -> tuple[list[str], list[str]]:
        """SHA-256 of each rank's full parameters, gathered from all ranks (equal while replicas agree), and the
        names of the parameters that hold a value that is not finite (on this rank)."""
        digest, nonfinite = hashlib.sha256(), []
        for name, param in self.unwrap(model).named_parameters():
            with self.gathered(param):
                digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
                if not bool(torch.isfinite(param.detach()).all()):
                    nonfinite.append(name)
        return self.gather(digest.hexdigest()), nonfinite

    def gathered(self, param: nn.Parameter):
        """Context in which ``param`` is whole on this rank (ZeRO-3 shards parameters)."""
        if self.cfg.zero_stage < 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters([param])

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Unsharded weights (gathered from all ranks under ZeRO-3); call on every rank."""
        return self.accelerator.get_state_dict(model)

    def save_shards(self, model: nn.Module, directory: Path, writes: Writes) -> None:
        """DeepSpeed's own per-rank model/optimizer shards (in ``directory/zero``); every rank calls.

        The empty universal-checkpoint info lets ``ds_to_universal`` convert them for another world size.  Each
        file and folder goes through ``writes``, so one that fails is counted and the save goes on (DeepSpeed's
        own barriers included) on every rank alike; the loads name the tag, so DeepSpeed's ``latest`` is not kept.
        """
        model.checkpoint_engine.writes = writes
        try:
            model.save_checkpoint(str(directory), tag=SHARD_TAG, client_state={UNIVERSAL_INFO: {}},
                                  save_latest=False)
        finally:
            model.checkpoint_engine.writes = None

    def gather(self, value) -> list:
        """``value`` of every rank, in rank order, on every rank."""
        from accelerate.utils import gather_object

        return gather_object([value])

    def load_shards(self, model: nn.Module, directory: Path) -> None:
        """Restore model and optimizer shards saved by ``save_shards`` (or converted to universal form).

        Two repairs after DeepSpeed's ZeRO-3 universal loader: it copies the first parameter
        group's settings (weight decay included) into every group, so each group gets back the
        hyperparameters it was built with (the learning rate is the scheduler's business); and it
        hands every parameter the same ``step`` tensor, which torch's Adam then increments once per
        sub-group, so each state gets its own copy.
        """
        groups = model.optimizer.param_groups
        settings = [{k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")} for group in groups]
        with safe_unpickling():  # a universal checkpoint's states are read by torch.load, not the engine
            path, _ = model.load_checkpoint(str(directory), tag=SHARD_TAG, load_optimizer_states=True,
                                            load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"{directory}: DeepSpeed found no checkpoint tagged {SHARD_TAG!r}")
        for group, own in zip(groups, settings):
            group.update(own)
        for state in base_optimizer(model.optimizer).state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

    def close(self) -> None:
        """After a successful run, on every rank: tear down DeepSpeed, then the process group.

        The DeepSpeed engine goes first, while the interpreter is whole: ZeRO-3 keeps gloo work
        objects for prefetched gathers, and one destroyed during interpreter shutdown aborts the
        process (SIGABRT) after the run has finished.  Not called after an error: destroying a
        group other ranks still use can hang, and the launcher stops the job anyway.
        """
        self.model = None
        self.accelerator.free_memory()  # DeepSpeedEngine.destroy() and Accelerate's references
        self.accelerator.end_training()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def safe_checkpoint_engine(model):
    """For the DeepSpeed engine ``model``: its torch checkpoint engine (DeepSpeed's ``CheckpointEngine`` interface, which
    the engine reads and writes every shard through) as polytrain uses it: every load
    restricted (``checkpoint.restricted``: no unpickling of arbitrary objects), every save and folder through
    the ``writes`` of the checkpoint being written (``checkpoint.Writes``: a failed write is counted, not raised,
    so all ranks finish the save together)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        writes: Writes | None = None

        def save(self, state_dict, path: str) -> None:
            write = lambda: TorchCheckpointEngine.save(self, state_dict, path)  # noqa: E731
            write() if self.writes is None else self.writes([Path(path)], tensor_bytes(state_dict), write)

        def makedirs(self, path, exist_ok=False) -> None:
            write = lambda: TorchCheckpointEngine.makedirs(self, path, exist_ok)  # noqa: E731
            write() if self.writes is None else self.writes([Path(path)], 0, write)

        def load(self, path: str, map_location=None):
            return restricted(torch.load)(path, map_location=map_location)

    made = type(model.checkpoint_engine)
    assert made is TorchCheckpointEngine, f"polytrain's DeepSpeed config made a {made.__name__}"
    return SafeCheckpointEngine(model._config)


def join_restarted_group(backend: str) -> None:
    """After torchrun restarted the job (``launch.max_restarts``): join the process group under keys of this
    attempt.

    torchrun's agent keeps its store across restarts (``TORCHELASTIC_USE_AGENT_STORE``), and the process group's
    keys in it are the same every attempt, so the restarted ranks would read the dead attempt's addresses and fail
    to connect.  DeepSpeed and Accelerate then use the group this makes.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    if not attempt or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return
    from torch.distributed import PrefixStore, TCPStore
    from torch.distributed.constants import default_pg_timeout

    world_size = int(os.environ["WORLD_SIZE"])
    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                     timeout=default_pg_timeout)
    torch.distributed.init_process_group(backend, store=PrefixStore(f"polytrain/attempt_{attempt}", store),
                                         rank=int(os.environ["RANK"]), world_size=world_size)


def deepspeed_config(cfg: EngineConfig, micro_batch_size: int, grad_accum: int, grad_clip: float,
                     load_universal: bool = False) -> dict:
    zero: dict = {"stage": cfg.zero_stage, "reduce_bucket_size": cfg.bucket_size,
                  "allgather_bucket_size": cfg.bucket_size}
    if cfg.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_prefetch_bucket_size=cfg.bucket_size)
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": 0.0 if steps_unchecked(cfg) else grad_clip,  # guard_step clips those
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "initial_scale_power": cfg.initial_loss_scale_power,
                 "loss_scale_window": cfg.loss_scale_window},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return config


def steps_unchecked(cfg: EngineConfig) -> bool:
    """ZeRO 0 in fp32: DeepSpeed steps the torch optimizer as it is, without looking at the gradients (its ZeRO,
    bf16 and fp16 optimizers skip a step whose global gradient norm is not finite)."""
    return cfg.zero_stage == 0 and cfg.precision == "fp32"


def guard_step(optimizer: torch.optim.Optimizer, grad_clip: float) -> None:
    """Give the torch optimizer DeepSpeed steps as it is what DeepSpeed's own optimizers do before a step.

    The global gradient norm is taken (every rank holds the same averaged gradients at stage 0, so all decide
    alike); a non-finite one drops the gradients, so the step changes no weight and no optimizer state, and sets
    ``overflow``, which DeepSpeed's engine reads to count the step as skipped; a finite one is clipped to
    ``grad_clip`` (0: not clipped) and reported as the step's ``_global_grad_norm``.
    """
    def before_step(opt: torch.optim.Optimizer, args, kwargs) -> None:
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        opt.overflow = not bool(torch.isfinite(norm))
        opt._global_grad_norm = float("inf") if opt.overflow else float(norm)
        if opt.overflow:
            for p in params:
                p.grad = None
        elif grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)

    optimizer.overflow = False
    optimizer.register_step_pre_hook(before_step)


def base_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, loss scaling)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
