"""GPU training throughput of a preset's nets: a sub-net alone, N sub-nets fused into one
grouped-convolution net, and the global net; projected hours for the preset's epochs.

    python benchmarks/gpu_throughput.py            # on a machine with a GPU
    python benchmarks/gpu_throughput.py --quick --preset cifar10-resnet32 --compile reduce-overhead
    python benchmarks/gpu_throughput.py --device cpu --threads 1 --batch-size 32 --quick   # one CPU core
    python benchmarks/gpu_throughput.py --device cpu --threads 1 --batch-size 32 --quick --arch resnet20 --width 2 --subnets 2  # the demo's nets

Measures images/s of a training step (forward, backward, SGD) on CIFAR-sized input, fp32 and
bf16 autocast, channels-last, side by side in one process: one sub-net (the paper's split:
4-8-16 channels), the N sub-nets fused (images/s of sub-net images), and the global net.
Then projects wall-clock hours of the preset's epochs on N GPUs (one sub-net per GPU in phase
1, on its shard with ``shard``; all N data-parallel in phase 3 and for the baseline; perfect
scaling) next to the paper's 5.65 h (DD) and 8.53 h (conventional). Last line: the projected
speedup. ``--device cpu`` skips the projection and measures bf16 only where the CPU has bf16
units (oneDNN's check: AVX512-BF16 or AMX), before fp32, whose line stays the last;
``--memory-format contiguous`` shows what channels-last gives.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from dd_mpi.argtypes import OneLineParser, positive  # noqa: E402
from dd_mpi.presets import PRESETS  # noqa: E402
from dd_mpi.decompose import subnet_spec  # noqa: E402
from dd_mpi.errors import UsageError  # noqa: E402
from dd_mpi.models import ModelSpec, build_model  # noqa: E402
from dd_mpi.train import member_losses  # noqa: E402
from harness import print_header  # noqa: E402

CIFAR_TRAIN = 50_000


def images_per_second(spec: ModelSpec, batch: int, bf16: bool, steps: int, compile_mode: str | None,
                      device: torch.device, memory_format: torch.memory_format, image_size: int = 32) -> float:
    """Images/s of training steps (per member for a fused net: its k nets' images)."""
    k = spec.members
    model = build_model(spec).to(device, memory_format=memory_format)
    forward = torch.compile(model, mode=compile_mode) if compile_mode else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    images = torch.randn(batch, 3 * k, image_size, image_size, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(spec.num_classes, (batch, k) if k > 1 else (batch,), device=device)
    criterion = torch.nn.CrossEntropyLoss(reduction="none")

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = member_losses(forward(images).float(), labels, criterion).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(10):  # cuDNN autotuning, compilation and allocator warm-up
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * batch * k / (time.perf_counter() - start)


def main() -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-size", type=positive(int), default=128)
    parser.add_argument("--preset", default="cifar10-resnet32", choices=tuple(PRESETS))
    parser.add_argument("--compile", default=None, metavar="MODE",
                        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                        help="torch.compile mode, e.g. default or reduce-overhead (CUDA graphs)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--threads", type=positive(int), help="torch threads on CPU (default: torch's)")
    parser.add_argument("--memory-format", default="channels_last", choices=("channels_last", "contiguous"))
    parser.add_argument("--arch", help="another global net than the preset's (with --width, --subnets, --shortcut)")
    parser.add_argument("--width", type=positive(float))
    parser.add_argument("--subnets", type=positive(int))
    parser.add_argument("--shortcut", choices=("A", "B"))
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    subnets = args.subnets if args.subnets is not None else preset["subnets"]
    try:  # the nets, checked as dd-train checks them (--arch, --width, --subnets) before any work
        global_spec = ModelSpec(args.arch if args.arch is not None else preset["arch"],
                                args.width if args.width is not None else preset["width"], 10,
                                args.shortcut if args.shortcut is not None else preset.get("shortcut") or "A")
        sub_spec = subnet_spec(global_spec, subnets)
    except UsageError as error:
        parser.error(str(error))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU visible (--device cpu measures a CPU)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    device = torch.device(args.device)
    memory_format = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}[args.memory_format]
    steps = 30 if args.quick else 100
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print_header("training throughput: a sub-net, N sub-nets fused, the global net")
    print(f"# {name}, {args.memory_format}, batch {args.batch_size}")
    results = {}
    if device.type == "cuda":
        precisions = ("fp32", "bf16")
    else:  # the fp32 line last: it is the CPU's headline
        precisions = ("bf16", "fp32") if torch.ops.mkldnn._is_mkldnn_bf16_supported() else ("fp32",)
    for precision in precisions:
        bf16 = precision == "bf16"
        measure = lambda spec: images_per_second(spec, args.batch_size, bf16, steps, args.compile,  # noqa: E731
                                                 device, memory_format)
        sub, fused, glob = measure(sub_spec), measure(sub_spec.fused(subnets)), measure(global_spec)
        results[precision] = (sub, glob)
        print(f"{precision}: sub-net {sub:,.0f} img/s, {subnets} fused {fused:,.0f} sub-net img/s "
              f"(fused / alone {fused / sub:.2f}x), global net {glob:,.0f} img/s, sub/global {sub / glob:.2f}x "
              f"(FLOP ideal {subnets ** 2}x); fused / global {fused / glob:.2f}x "
              f"(sub-net images per global image: the ceiling of phase 1's shard speed ratio)")
    if device.type != "cuda":
        return
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
