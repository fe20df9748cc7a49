"""embedding_service.backends.torch"""
