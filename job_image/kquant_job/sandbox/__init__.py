"""Running model code confined: a child process without credentials, restricted by Landlock
and rlimits (:mod:`~kquant_job.sandbox.confine`), started and judged by
:func:`~kquant_job.sandbox.runner.run_stage`."""
