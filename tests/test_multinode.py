"""A multi-node rehearsal on one host: two "nodes" of 2 ranks each, started as two separate
launcher trees (torchrun --nnodes 2 with a c10d rendezvous on the loopback address) or by
one mpiexec over two host entries; the ranks' places (node, local rank), the group layout and
the run are checked. (A two-node Slurm on one host: slurm/NOTES.md says why not here.)

    .venv/bin/python -m pytest -q tests/test_multinode.py
"""

from __future__ import annotations

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


def test_two_torchrun_nodes_meet_at_a_c10d_rendezvous(tmp_path):
    port, out = free_port(), tmp_path / "run"
    node = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "rehearsal", "--max-restarts", "0"]
    env = launcher_free_env()
    procs = [subprocess.Popen([*node, "--node-rank", str(k), "-m", "dd_mpi", *RUN, "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for k in (0, 1)]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n=====\n".join(log[-4000:] for log in logs)
    check_two_nodes(out, "torchrun")


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
