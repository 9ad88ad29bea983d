"""What autograd keeps of an op for its backward pass."""
import torch


def saved_bytes(fn, *args) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of ``fn(*args)``."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(sizes)
