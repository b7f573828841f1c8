"""Named runs (``--preset NAME``; later flags win): the paper's experiments, and the
project's wide-net variants.

The paper's CIFAR runs (Gu et al., ETNA 2022, §5; PAPER.md): a *standard* ResNet32/56/110
(16-32-64 channels, 1x1-projection shortcuts: ResNet32 has the paper's 0.47 M = 466,906
parameters) split into 4 sub-nets of a quarter of the width (29,854 parameters each, ~1/16),
each trained on its own quarter of the data (``shard``: "the corresponding decomposed
samples"), then composed and fine-tuned; the conventional run in the same job.

The paper gives no recipe. The baseline is He et al. 2016's CIFAR recipe, which the paper
prints as its reference: SGD with plain momentum 0.9, weight decay 1e-4 on all weights, a
global batch of 128 on any number of ranks, LR 0.1 divided by 10 at 50 % and 75 % of 164
epochs (32k and 48k of 64k iterations), and for ResNet-110 a warm-up at LR 0.01 for the
first ~400 iterations (1 epoch). The sub-nets take the same recipe on their shard (164 of
their epochs are ~1/16 of the baseline's work each); the composed net fine-tunes at LR
0.01 for the epochs below, with the same step decay. DD's total budget stays under the
baseline's; BENCHMARKS.md and PAPER.md give the reduced-scale measurements behind the split.
"""

from __future__ import annotations

HE_RECIPE = dict(global_batch_size=128, lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
                 bn_weight_decay=True, schedule="step", warmup_epochs=0.0, finetune_warmup_epochs=0.0)
PAPER_SPLIT = dict(width=1.0, shortcut="B", subnets=4, subnet_data="shard", strategy="both")
PAPER_EPOCHS = dict(subnet_epochs=164, finetune_epochs=82, baseline_epochs=164, finetune_lr=0.01)


def _cifar_paper(dataset: str, depth: int) -> dict:
    warmup = dict(warmup_epochs=1.0, warmup_style="constant") if depth == 110 else {}
    return dict(
        dataset=dataset, arch=f"resnet{depth}", **PAPER_SPLIT, **{**HE_RECIPE, **warmup}, **PAPER_EPOCHS,
        _doc=f"the paper's run: {dataset.upper()}, standard ResNet{depth} (shortcut B) split into 4 "
             f"quarter-width sub-nets on their own quarter of the data (shard), DD and baseline; He et al.'s "
             f"recipe (batch 128, LR 0.1, x0.1 at 50/75 %{', 1 warm-up epoch at LR/10' if depth == 110 else ''}): "
             f"sub-nets {PAPER_EPOCHS['subnet_epochs']} epochs, fine-tune {PAPER_EPOCHS['finetune_epochs']} "
             f"at LR 0.01, baseline {PAPER_EPOCHS['baseline_epochs']}")


def _cifar_wide(dataset: str, depth: int) -> dict:
    return dict(
        dataset=dataset, arch=f"resnet{depth}", width=4.0, subnets=4, batch_size=128, lr=0.1,
        schedule="cosine", subnet_epochs=160, finetune_epochs=40, baseline_epochs=200,
        finetune_lr=0.02, subnet_data="full", strategy="both",
        _doc=f"the project's wide net (not the paper's): {dataset.upper()}, 4x-wide ResNet{depth} split into 4 "
             "standard ResNets on all the data; sub-nets 160 epochs, fine-tune 40 at LR/5, baseline 200; cosine")


def _food101(depth: int, subnets: int) -> dict:
    return dict(
        dataset="food101", arch=f"resnet{depth}", width=1.0, subnets=subnets, batch_size=64, lr=0.1,
        schedule="cosine", subnet_epochs=60, finetune_epochs=20, baseline_epochs=90,
        finetune_lr=0.02, subnet_data="shard", image_size=224, strategy="both",
        _doc=f"the paper's Food-101 run: ResNet{depth} (standard width) split into {subnets}, each on its shard "
             "of the data (PAPER.md R2), DD and baseline; "
             "sub-nets 60 epochs, fine-tune 20 at LR/5, baseline 90 (ImageNet-style); cosine")


PRESETS: dict[str, dict] = {
    **{f"{ds}-resnet{d}": _cifar_paper(ds, d) for ds in ("cifar10", "cifar100") for d in (32, 56, 110)},
    **{f"{ds}-resnet{d}-w4": _cifar_wide(ds, d) for ds in ("cifar10", "cifar100") for d in (32, 56, 110)},
    **{f"food101-resnet{d}{suffix}": _food101(d, n) for d in (50, 101) for n, suffix in ((4, ""), (8, "-n8"))},
}
