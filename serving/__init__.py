"""v4d.serving: model config and size math, the V4 model, engines, expert shards and the Serve app."""
