"""embedding_service.api.cohere"""
