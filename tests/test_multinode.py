"""A multi-node rehearsal on one host: two "nodes" of 2 ranks each, started as two separate
launcher trees (torchrun --nnodes 2 with a c10d rendezvous on the loopback address) or by
one mpiexec over two host entries; the ranks' places (node, local rank), the group layout and
the run are checked. (A two-node Slurm on one host: slurm/NOTES.md says why not here.)

    .venv/bin/python -m pytest -q tests/test_multinode.py
"""

from __future__ import annotations

import socket
import subprocess

import pytest

from dd_mpi.launch import free_port

from helpers import BIN, TINY, explain, launcher_free_env, read_report

pytestmark = pytest.mark.slow

RUN = [*TINY, "--subnets", "4", "--strategy", "dd"]  # 4 sub-nets on 4 ranks: one per rank, 2 per node


def check_two_nodes(out, launcher: str) -> dict:
    report = read_report(out)
    assert report["world_size"] == 4 and report["launcher"] == launcher
    places = report["ranks"]
    assert [p["rank"] for p in places] == [0, 1, 2, 3]
    assert [p["local_rank"] for p in places] == [0, 1, 0, 1]  # each node numbers its own ranks
    assert [p["local_world_size"] for p in places] == [2, 2, 2, 2]
    assert places[0]["node"] == places[1]["node"] != places[2]["node"] == places[3]["node"]
    assert report["groups"] == [[0], [1], [2], [3]] and len(report["sub_nets"]) == 4
    assert report["transfer_T"]["top1"] >= 0
    return report


def two_torchrun_nodes(tmp_path, node_args: list[list[str]]) -> tuple[list[int], list[str]]:
    """Two torchrun launcher trees, node k running dd_mpi with ``node_args[k]``: exit codes, logs."""
    port = free_port()
    node = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "rehearsal", "--max-restarts", "0"]
    env = launcher_free_env()
    procs = [subprocess.Popen([*node, "--node-rank", str(k), "-m", "dd_mpi", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for k, args in enumerate(node_args)]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], logs


def test_two_torchrun_nodes_meet_at_a_c10d_rendezvous(tmp_path):
    out = tmp_path / "run"
    codes, logs = two_torchrun_nodes(tmp_path, [[*RUN, "--out", str(out)]] * 2)
    assert codes == [0, 0], "\n=====\n".join(log[-4000:] for log in logs)
    check_two_nodes(out, "torchrun")


def test_a_node_started_with_other_flags_is_one_line_at_start_up(tmp_path):
    """Node 1 with another --seed trained its sub-nets from it, silently (config.json said node
    0's); with another --subnets the ranks hung at the composition."""
    out = tmp_path / "run"
    codes, logs = two_torchrun_nodes(tmp_path, [[*RUN, "--out", str(out)], [*RUN, "--seed", "1", "--out", str(out)]])
    assert 0 not in codes, "\n=====\n".join(log[-4000:] for log in logs)
    assert (f"dd-train: error: rank 2 (on {socket.gethostname()}) was started with other settings than rank 0 (on "
            f"{socket.gethostname()}): --seed 1 (rank 0: 0): start every rank with the same flags and config file"
            in logs[0]), logs[0][-4000:]
    assert "dd-train: rank" not in logs[0] + logs[1] and not (out / "checkpoints").exists()  # (no rank failed)


@pytest.mark.mpi
def test_mpiexec_over_two_host_entries(tmp_path):
    """Hydra's fork launcher places 2 ranks on each of two host entries, as on two nodes; the
    ranks meet at rank 0's address, agreed over MPI."""
    mpiexec = BIN / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("pip's MPICH (mpiexec) is not installed: pip install 'dd_mpi[mpi]'")
    out = tmp_path / "run"
    result = subprocess.run([str(mpiexec), "-launcher", "fork", "-hosts", "nodeA:2,nodeB:2", "-n", "4",
                             str(BIN / "python"), "-m", "dd_mpi", *RUN, "--out", str(out)],
                            capture_output=True, text=True, timeout=600, env=launcher_free_env())
    assert result.returncode == 0, explain(result)
    check_two_nodes(out, "mpi")
