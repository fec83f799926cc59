"""Fake push services: real HTTP/2 over TLS on 127.0.0.1, for tests and bench/.

``h2server.FakeH2Server`` is the generic server (records requests, answers
scripted replies, can send GOAWAY or drop the connection); ``apns`` and ``fcm``
add the provider-specific authentication checks; ``keys`` makes test
credentials.  The pytest fixtures built on them are in
``tests/fixtures_fake_push.py``.
"""
