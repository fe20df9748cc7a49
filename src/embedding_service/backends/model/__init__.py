"""embedding_service.backends.model"""
