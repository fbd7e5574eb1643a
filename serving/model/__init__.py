"""The DeepSeek-V4 architecture in PyTorch."""
