"""The compute-node side: Prolog/Epilog/jobcomp hooks, the GPU agent, the spool, NVML.

Stdlib only on the start-up path: nothing here may import pydantic, sqlite-utils or textual."""
