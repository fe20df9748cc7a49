"""embedding_service.backends.vllm"""
