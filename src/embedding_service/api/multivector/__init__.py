"""embedding_service.api.multivector"""
