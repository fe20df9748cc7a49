"""embedding_service.backends.fake"""
