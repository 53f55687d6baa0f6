"""The SLA planner: a performance model of the workers, a discrete-event simulator of the cluster, and
the policy that sizes the prefill and decode pools from TTFT and ITL targets.

Torch-free and Ray-free (README.md in this folder): `deploy/` wires it to profiling runs, live metrics and
the admin path.
"""

TANDEM_PACKAGE = "tandem-serve"  # deploy/import_names.py: this import name is Tandem's
