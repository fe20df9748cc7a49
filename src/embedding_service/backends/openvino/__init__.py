"""embedding_service.backends.openvino"""
