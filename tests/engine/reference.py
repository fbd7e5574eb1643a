"""What the engine tests compare against."""


def greedy(model, prompt, n):
    """The in-process model's greedy continuation: one prefill, then one token at a time."""
    kv, seq = model.scratch_cache(len(prompt) + n)
    logits = model.forward([(prompt, seq)], kv)[0]
    out = []
    for i in range(n):
        out.append(int(logits.argmax()))
        if i + 1 < n:
            logits = model.forward([([out[-1]], seq)], kv)[0]
    return out
