"""``python -m dd_mpi`` = ``dd-train`` (and what torchrun runs with ``-m dd_mpi``)."""

import sys

from .cli import main

sys.exit(main())
