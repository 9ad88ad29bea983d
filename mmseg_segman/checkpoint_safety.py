"""Placeholder replaced by the checkpoint allow-list (see issue 2, item 9)."""


def allow_mmengine_checkpoints() -> None:
    """Admit mmengine's checkpoint types to ``torch.load(weights_only=True)``."""
