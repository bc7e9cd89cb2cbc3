"""The HTTP layer: the FastAPI app (OpenAI and SGLang-native routes), request schemas, the async
wrapper that runs the engine loop in a thread, and Prometheus metrics."""
