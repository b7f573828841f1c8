"""GPU training throughput of a preset's nets: a sub-net alone, N sub-nets fused into one
grouped-convolution net, and the global net; projected hours for the preset's epochs.

    python benchmarks/gpu_throughput.py            # on a machine with a GPU
    python benchmarks/gpu_throughput.py --quick --preset cifar10-resnet32 --compile reduce-overhead

Measures images/s of a training step (forward, backward, SGD) on CIFAR-sized input, fp32 and
bf16 autocast, channels-last, side by side in one process: one sub-net (the paper's split:
4-8-16 channels), the N sub-nets fused (images/s of sub-net images), and the global net.
Then projects wall-clock hours of the preset's epochs on N GPUs (one sub-net per GPU in phase
1, on its shard with ``shard``; all N data-parallel in phase 3 and for the baseline; perfect
scaling) next to the paper's 5.65 h (DD) and 8.53 h (conventional). Last line: the projected
speedup.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from dd_mpi.presets import PRESETS  # noqa: E402
from dd_mpi.decompose import subnet_spec  # noqa: E402
from dd_mpi.models import ModelSpec, build_model  # noqa: E402
from dd_mpi.train import member_losses  # noqa: E402

CIFAR_TRAIN = 50_000


def images_per_second(spec: ModelSpec, batch: int, bf16: bool, steps: int, compile_mode: str | None) -> float:
    """Images/s of training steps (per member for a fused net: its k nets' images)."""
    device = torch.device("cuda")
    k = spec.members
    model = build_model(spec).to(device, memory_format=torch.channels_last)
    forward = torch.compile(model, mode=compile_mode) if compile_mode else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    images = torch.randn(batch, 3 * k, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(10, (batch, k) if k > 1 else (batch,), device=device)
    criterion = torch.nn.CrossEntropyLoss(reduction="none")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = member_losses(forward(images).float(), labels, criterion).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(10):  # cuDNN autotuning, compilation and allocator warm-up
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return steps * batch * k / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--preset", default="cifar10-resnet32")
    parser.add_argument("--compile", default=None, metavar="MODE",
                        help="torch.compile mode, e.g. default or reduce-overhead (CUDA graphs)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_throughput: no GPU visible")
    torch.backends.cudnn.benchmark = True
    steps = 30 if args.quick else 100
    preset = PRESETS[args.preset]
    subnets = preset["subnets"]
    global_spec = ModelSpec(preset["arch"], preset["width"], 10, preset.get("shortcut", "A"))
    sub_spec = subnet_spec(global_spec, subnets)
    print(f"# {' '.join(sys.argv)}\n# {torch.cuda.get_device_name()} torch {torch.__version__}")
    results = {}
    for precision in ("fp32", "bf16"):
        bf16 = precision == "bf16"
        sub = images_per_second(sub_spec, args.batch_size, bf16, steps, args.compile)
        fused = images_per_second(sub_spec.fused(subnets), args.batch_size, bf16, steps, args.compile)
        glob = images_per_second(global_spec, args.batch_size, bf16, steps, args.compile)
        results[precision] = (sub, glob)
        print(f"{precision}: sub-net {sub:,.0f} img/s, {subnets} fused {fused:,.0f} sub-net img/s "
              f"(fused / alone {fused / sub:.2f}x), global net {glob:,.0f} img/s, sub/global {sub / glob:.2f}x "
              f"(FLOP ideal {subnets ** 2}x)")
    sub, glob = results["bf16"]
    e1, e3, eb = preset["subnet_epochs"], preset["finetune_epochs"], preset["baseline_epochs"]
    per_subnet = CIFAR_TRAIN // subnets if preset.get("subnet_data") == "shard" else CIFAR_TRAIN
    hours = lambda images, rate: images / rate / 3600  # noqa: E731
    dd = hours(e1 * per_subnet, sub) + hours(e3 * CIFAR_TRAIN, subnets * glob)
    baseline = hours(eb * CIFAR_TRAIN, subnets * glob)
    print(f"projected on {subnets} such GPUs (bf16, perfect scaling), {args.preset}: "
          f"DD {e1}+{e3} epochs {dd:.2f} h vs conventional {eb} epochs {baseline:.2f} h "
          f"(paper: 5.65 h vs 8.53 h)")
    print(f"projected speedup: {baseline / dd:.2f}")


if __name__ == "__main__":
    main()
