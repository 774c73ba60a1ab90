"""`ember bench serve`: an async load generator for any OpenAI-compatible streaming server.

Owns datasets, the streamed client, arrivals, the report and its plot; never starts a server.
"""
