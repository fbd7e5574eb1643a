"""v4d.operator: API types, planner, rendering, kopf handlers and the `v4d` CLI (top layer)."""
