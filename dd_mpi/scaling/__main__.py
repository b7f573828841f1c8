"""python -m dd_mpi.scaling: the same as dd-scaling."""

import sys

from .cli import main

sys.exit(main())
