"""Sequence parallelism (DeepSpeed-Ulysses): per-rank memory of one long sequence's step at N = 1, 2, 4, and what
the all-to-alls cost, side by side.

N processes (gloo on CPU, NCCL on GPUs) share one sequence of ``--tokens`` tokens through a small causal decoder
(RoPE, SDPA), each computing its slice of it, as ``engine.sequence_parallel: N`` trains.  Per rank and N:

- ``saved_mib``: the activations autograd keeps for the backward pass (the tensors its saved-tensor hooks see,
  each storage once, parameters left out): what sequence parallelism divides;
- ``peak_mib``: how far the step's memory rose above the memory before it (resident memory on CPU, allocated
  memory on a GPU): the saved activations plus the step's transients (logits, attention workspace, gradients);
- ``plan_mib``: ``polytrain plan``'s activation estimate for the same model and length at N;
- ``step_s``, ``all_to_all_s`` and ``all_to_all_mib``: one forward + backward, the time inside its all-to-alls
  (waits for the other ranks included) and what they sent.

On a CPU the N processes share its cores, so compare the all-to-alls' share of a step, not absolute times.

    python bench/sequence_parallel.py [--tokens 8192] [--dim 128] [--heads 8] [--layers 2] [--sizes 1 2 4]

Last line: one JSON object with the figures.
"""

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from polytrain.config import build_config
from polytrain.models.heads import text_segment
from polytrain.models.model import PolyModel
from polytrain.platform.distributed.memory_planner import activation_bytes
from polytrain.platform.distributed.process_layout import ProcessLayout
from polytrain.platform.distributed.sequence_parallel import sequence_shard
from polytrain.tokens import EmbedSpec, TaskBatch

VOCAB = 512
MIB = 2**20


def recipe(args) -> dict:
    """The bench's model as a recipe (what the planner estimates from)."""
    backbone = {"dim": args.dim, "n_heads": args.heads, "encoder_layers": 0, "decoder_layers": args.layers,
                "position": "rope", "attention": "sdpa"}
    task = {"head": "decoder_only", "train": "builtin:stdlib/train", "val": "builtin:stdlib/val", "batch_size": 1,
            "seq_len": args.tokens}
    return {"model": {"backbone": backbone}, "tokenizers": {"text": {"vocab_size": VOCAB, "max_len": args.tokens}},
            "data": {"tasks": {"lm": task}}}


def memory_now(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_since(device: torch.device, before: int) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - before
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


class AllToAllClock:
    """Seconds spent inside DeepSpeed's all_to_all_single (what DistributedAttention calls) while installed, and
    the bytes it was handed."""

    def __init__(self, device: torch.device):
        import deepspeed.comm

        self.seconds, self.bytes, self.device = 0.0, 0, device
        self.original = deepspeed.comm.all_to_all_single

        def timed(output, tensor, *args, **kwargs):
            self.sync()
            self.bytes += tensor.nbytes
            began = time.perf_counter()
            work = self.original(output, tensor, *args, **kwargs)
            self.sync()
            self.seconds += time.perf_counter() - began
            return work

        deepspeed.comm.all_to_all_single = timed

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def step(model: PolyModel, batch: dict[str, TaskBatch], saved: dict[int, int] | None) -> None:
    """Forward + backward; ``saved`` collects the bytes of each storage autograd keeps for the backward pass."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if saved is not None and storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(batch)["lm"]
    loss.backward()
    model.zero_grad(set_to_none=True)


def rank_figures(rank: int, size: int, port: int, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=size)
    shard = sequence_shard(ProcessLayout(size, size), rank, backend)
    cfg = build_config(recipe(args))
    torch.manual_seed(0)
    model = PolyModel(cfg.model, [EmbedSpec("text", VOCAB, (1, args.tokens))], {"lm": "decoder_only"}).to(device)
    model.train()
    model.shard_sequences(shard)
    ids = torch.randint(4, VOCAB, (1, args.tokens + 1), generator=torch.Generator().manual_seed(1))
    batch = {"lm": TaskBatch(text_segment(ids[:, :-1]), ids[:, 1:]).to(device)}
    warm = {"lm": TaskBatch(text_segment(ids[:, :256]), ids[:, 1:257]).to(device)}
    step(model, warm, None)  # kernels, allocator and comm buffers set up on a short sequence
    clock = AllToAllClock(device)
    before = memory_now(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    saved: dict[int, int] = {}
    clock.sync()
    began = time.perf_counter()
    step(model, batch, saved)
    clock.sync()
    figures = {"saved_mib": sum(saved.values()) / MIB, "peak_mib": peak_since(device, before) / MIB,
               "step_s": time.perf_counter() - began, "all_to_all_s": clock.seconds,
               "all_to_all_mib": clock.bytes / MIB}
    Path(out, f"rank{rank}.json").write_text(json.dumps(figures))
    dist.barrier()
    dist.destroy_process_group()


def measure(size: int, args) -> dict[str, float]:
    """The figures of the rank that needs the most (the slowest, for times)."""
    with tempfile.TemporaryDirectory() as out, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        mp.start_processes(rank_figures, args=(size, port, args, out), nprocs=size, start_method="spawn")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(size)]
    return {key: max(r[key] for r in ranks) for key in ranks[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    cfg = build_config(recipe(args))
    rows = {}
    for size in args.sizes:
        row = measure(size, args)
        row["plan_mib"] = activation_bytes(cfg, {}, size) / MIB  # text only: no patch grids
        rows[size] = row
        base = rows[args.sizes[0]]
        print(f"N={size}: saved activations {row['saved_mib']:.1f} MiB/rank "
              f"(x{row['saved_mib'] / base['saved_mib']:.3f} of N={args.sizes[0]}; plan {row['plan_mib']:.1f}), "
              f"step peak {row['peak_mib']:.1f} MiB/rank "
              f"(x{row['peak_mib'] / base['peak_mib']:.3f}), step {row['step_s']:.2f} s, all-to-alls "
              f"{row['all_to_all_s']:.2f} s ({row['all_to_all_s'] / row['step_s']:.1%}, "
              f"{row['all_to_all_mib']:.1f} MiB sent)", flush=True)
    base = rows[args.sizes[0]]
    figures = {"tokens": args.tokens, "dim": args.dim, "heads": args.heads, "layers": args.layers,
               "device": "cuda" if torch.cuda.is_available() else "cpu",
               "sizes": {f"N={n}": {**{k: round(v, 3) for k, v in r.items()},
                                    "saved_vs_first": round(r["saved_mib"] / base["saved_mib"], 4),
                                    "peak_vs_first": round(r["peak_mib"] / base["peak_mib"], 4),
                                    "all_to_all_share": round(r["all_to_all_s"] / r["step_s"], 4)}
                         for n, r in rows.items()}}
    print(json.dumps(figures))


if __name__ == "__main__":
    sys.exit(main())
