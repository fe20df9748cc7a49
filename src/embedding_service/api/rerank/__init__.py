"""embedding_service.api.rerank"""
