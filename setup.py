"""dd_mpi: domain-decomposition training of wide CNNs on HPC clusters."""

import re
from pathlib import Path

from setuptools import find_packages, setup

# one version, in dd_mpi/__init__.py (what --version and report.json say)
VERSION = re.search(r'__version__ = "([^"]+)"', (Path(__file__).parent / "dd_mpi" / "__init__.py").read_text())[1]

setup(
    name="dd_mpi",
    version=VERSION,
    description="Domain-decomposition training of wide CNNs: split into narrow sub-networks, "
                "train them in rank groups, compose exactly, fine-tune globally",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dd_mpi", "dd_mpi.*"]),
    install_requires=[
        "torch>=2.1",  # our machines: torch 2.14.1
        "torchvision>=0.16",  # our machines: torchvision 0.29.1
        "numpy",
        "mpi4py>=3.1",
        "tqdm",
        "pyyaml",  # --config files
    ],
    extras_require={
        "mpi": ["mpich"],  # pip's MPICH, for machines without a site MPI
        "horovod": ["horovod==0.28.1", "cmake<4"],  # build: launch/build_horovod.sh
        "plot": ["matplotlib"],
        "tensorboard": ["tensorboard"],  # --tensorboard
        "bench": ["scikit-learn"],  # benchmarks on a real image set (scikit-learn's digits)
        "test": ["pytest", "pytest-timeout", "hypothesis", "mpich", "matplotlib", "Pillow", "tensorboard",
                 "scikit-learn"],
    },
    entry_points={"console_scripts": [
        "dd-train=dd_mpi.cli:main",
        "dd-inspect=dd_mpi.inspection:main",
        "dd-report=dd_mpi.reporting:main",
        "dd-scaling=dd_mpi.scaling.cli:main",
    ]},
)
