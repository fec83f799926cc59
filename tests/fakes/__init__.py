"""Fake push services for tests: real HTTP/2 over TLS on 127.0.0.1.

``h2server.FakeH2Server`` is the generic server (records requests, answers
scripted replies, can send GOAWAY or drop the connection); ``apns`` and ``fcm``
add the provider-specific authentication checks; ``keys`` makes test
credentials; ``fixtures`` holds the pytest fixtures (import them into a test
module: ``from fakes.fixtures import *``).
"""
