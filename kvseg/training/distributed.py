"""The process group a launcher formed, checked against what the launcher was asked for.

``accelerate launch --cpu --num_machines 2 --num_processes 2 --machine_rank R ...`` does not form a
process group: accelerate's simple launcher (``accelerate/utils/launch.py``,
``prepare_simple_launcher_cmd_env``) starts one plain process per command and leaves the rest to
MPI. Without MPI every shell silently trains its own one-process run. The same happens with
``--num_processes 2`` and no ``--multi_gpu`` on a machine with fewer than two GPUs. The route that
works is a launcher file with ``distributed_type: MULTI_GPU`` and ``use_cpu: true``: accelerate then
starts the processes through torchrun, which forms one group across processes and machines.
"""

from __future__ import annotations

import os

from kvseg.errors import KvsegError

# Where launchers announce the process count: torchrun, then Intel MPI, Open MPI and MVAPICH.
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
WORKING_ROUTE = (
    "launch with a file that has distributed_type: MULTI_GPU and use_cpu: true, e.g. "
    "--config_file configs/accelerate/two_machines_cpu.yaml (cpu_2proc.yaml on one machine)"
)


class ProcessGroupError(KvsegError):
    """The launcher asked for several processes or machines but they did not form one process group."""


def launched_world_size() -> int | None:
    """The process count a launcher announced to this process (``WORLD_SIZE`` or an MPI size), if any."""
    for name in WORLD_SIZE_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def check_process_group(num_processes: int) -> None:
    """Stop when the launcher asked for more processes or machines than the process group holds.

    ``num_processes`` is the size of the group that formed (``Accelerator.num_processes``). Two
    launcher footprints give the request away:

    * a world size (``WORLD_SIZE``, ``PMI_SIZE``, ...) larger than the group;
    * accelerate's simple launcher, which sets ``ACCELERATE_USE_CPU`` in every process it starts and
      ``MASTER_ADDR``/``MASTER_PORT`` only when it was asked for more than one process or machine,
      with no world size: this is the ``--cpu`` multi-machine route, one independent run per shell.
      The environment does not carry the counts that were asked for; the message names the address.
      A one-process ``accelerate launch`` from a shell that exports ``MASTER_ADDR`` looks the same:
      unset it there.

    Raises:
        ProcessGroupError: one line naming what the launcher asked for and the route that works.
    """
    world_size = launched_world_size()
    if world_size is not None:
        if world_size > num_processes:
            raise ProcessGroupError(
                f"the launcher started {world_size} processes (WORLD_SIZE or MPI size) but the process group has "
                f"{num_processes} member(s); {WORKING_ROUTE}"
            )
        return
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if num_processes == 1 and "ACCELERATE_USE_CPU" in os.environ and address and port:
        raise ProcessGroupError(
            f"accelerate launch asked for several processes or machines (it set MASTER_ADDR={address}, "
            f"MASTER_PORT={port}) but the process group has 1 member: its plain launcher (--cpu, or --num_processes "
            f"without --multi_gpu) runs each process alone; {WORKING_ROUTE}"
        )
