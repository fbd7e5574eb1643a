"""The runtime layer: what owns a replica's device (`device`), dtype, rank and packed batch (`runner`),
and the direct engine <-> expert-shard channels that carry token rows off Serve's request path
(`channels`)."""
