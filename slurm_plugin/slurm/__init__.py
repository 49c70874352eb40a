"""The Slurm adapter: the interface, the factory that picks a backend, and the backends."""
