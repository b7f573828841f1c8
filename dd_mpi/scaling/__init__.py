"""dd-scaling: scaling studies of dd-train over world sizes P and sub-network counts N.

sweep runs the (P, N) pairs here or on Slurm; collect turns finished runs into scaling.csv
(efficiency, speedup, time to accuracy); perfmodel is the alpha-beta model calibrated on those
runs and projected to more GPUs, netbench measures alpha and beta here; plots draws the figures;
cli is the command (its docstring: how to run a study).
"""

from .cli import gpu_list, int_list, main
from .collect import (SCALING_FIELDS, add_efficiencies, collect_table, find_runs, rows_csv, run_rows, speedup,
                      strong_efficiency, time_to_target, weak_efficiency)
from .errors import ScalingError
from .netbench import fit_alpha_beta, measure_network
from .perfmodel import (Network, Workload, broadcast_seconds, epoch_seconds, gather_seconds,
                        gradient_allreduce_seconds, model_params, project, projectable, ring_allreduce_seconds)
from .sweep import local_sweep, slurm_command, valid_pairs

# The function collect() is not re-exported: it would hide the submodule dd_mpi.scaling.collect.
__all__ = ["SCALING_FIELDS", "Network", "ScalingError", "Workload", "add_efficiencies", "broadcast_seconds",
           "collect_table", "epoch_seconds", "find_runs", "fit_alpha_beta", "gather_seconds", "gpu_list",
           "gradient_allreduce_seconds", "int_list", "local_sweep", "main", "measure_network", "model_params",
           "project", "projectable", "ring_allreduce_seconds", "rows_csv", "run_rows", "slurm_command", "speedup",
           "strong_efficiency", "time_to_target", "valid_pairs", "weak_efficiency"]
