"""The controller side: the policy daemon, its workers, requeue, reconcile, Prometheus and the
Lua shim."""
