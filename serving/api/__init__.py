"""The HTTP face of v4d: OpenAI- and Anthropic-compatible request/response shapes, SSE, errors."""
