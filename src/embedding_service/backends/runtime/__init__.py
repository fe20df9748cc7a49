"""embedding_service.backends.runtime"""
