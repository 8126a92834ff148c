"""powertrain across a cluster: what spans the nodes of one store, and its resource managers.

- ``cap.py``: one power cap over every node of a store, divided among the running jobs by the
  daemon that leads.
- ``ray/``: Ray places powertrain jobs by each node's power headroom (docs/ray.md).
- ``slurm.py``: a Slurm job is one powertrain job, registered by Slurm's prolog before it starts
  and ended by its epilog (``powertrain slurm prolog|epilog``, docs/slurm.md); ``budgets.py`` is
  the budget syntax a job asks with (``powertrain:watts=300,energy_wh=800``), pure, so that the
  settings can check a site default with it.
"""
