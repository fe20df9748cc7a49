"""embedding_service.api.middleware"""
