"""Tests that drive the real local Slurm cluster (contrib/devcluster)."""
