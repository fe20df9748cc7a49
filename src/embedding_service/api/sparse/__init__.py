"""embedding_service.api.sparse"""
