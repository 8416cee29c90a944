"""vLLM general plugin for safetylock (entry point ``vllm.general_plugins``)."""


def register() -> None:
    """Called by vLLM in every process; does nothing without a safetylock configuration."""
