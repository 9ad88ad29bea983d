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


def kept_storages(fn, *args):
    """``(fn(*args), {storage: bytes})``: the distinct storages autograd keeps for the
    backward pass of ``fn(*args)`` (views of one storage counted once)."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return fn(*args), kept
