"""SLURM through submitit: one submit path for both front doors, cluster profiles, requeue, suites' jobs."""
