"""embedding_service.api.embed"""
