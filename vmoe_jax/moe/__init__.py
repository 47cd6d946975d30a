"""The sparse MoE layer: its spec, routers, routing, dispatch plans, losses, dropless path."""
