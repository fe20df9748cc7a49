"""embedding_service.api.tokenize"""
