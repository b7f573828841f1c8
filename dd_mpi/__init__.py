"""dd_mpi: domain-decomposition training of wide CNNs on HPC clusters.

A wide ResNet is split along its channels into N narrow sub-networks, trained by N groups of
ranks with no traffic between groups, composed exactly into the wide net, and fine-tuned by
all ranks (Gu, Zhang, Liu, Cai, ETNA 56 (2022)). See README.md.
"""

__version__ = "0.1.0"
