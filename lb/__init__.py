"""shoal.lb: the routing-mesh data path (userspace L4 load balancer)."""
