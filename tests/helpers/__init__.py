"""Helpers shared by test modules (import as `from helpers.redis_server import RedisServer`)."""
