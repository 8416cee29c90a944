"""Everything about serving a lock, engine-agnostic: configuration, the tensor-parallel fold, server processes.

Rule: ``safetylock/serve/`` owns what a server needs to know (the operator's configuration, request α policy,
``b_l = W_o · δ_l`` over tensor-parallel ranks, starting and talking to servers). ``plugins/vllm_hook/`` only
adapts vLLM's classes to it (loader and runner hooks, the input processor, endpoint routes) and decides nothing.
"""
