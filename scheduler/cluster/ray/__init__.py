"""Ray places powertrain jobs by each node's power headroom (docs/ray.md).

- Each node's Ray node advertises a custom resource ``watts`` (the sum of its GPUs' max limits),
  its GPUs, and ``powertrain-node:<name>`` (``powertrain ray resources`` prints the flags).
- The node's daemon (``--ray-address``) keeps a reservation in Ray of all but its headroom: what
  jobs outside Ray hold, the node cap, the GPUs' idle power (``headroom``, ``ledger``,
  ``reserve``; the daemon runs the loop as a child, ``supervise``).
- ``submit`` (``powertrain ray submit``) asks Ray for ``{"GPU": N, "watts": N × W}`` and runs the
  command as a job of the daemon of the node Ray chose.

Only the modules of this package import Ray, inside their functions or in the ``reserve`` child:
importing the package never needs it.
"""

from scheduler.cluster.ray.submit import RayJob, RayJobError, submit

__all__ = ["RayJob", "RayJobError", "submit"]
