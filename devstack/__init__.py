"""The real local stack that tests/, bench/ and scripts/run-local share.

A self-contained Dovecot 2.3 on 127.0.0.1 wired to a real ``chatmail-metadata``
process, the clients that talk to them (IMAP, LMTP), stand-ins for the services
around them (the chatmail-turn socket, an HTTP push sink, fake APNs/FCM/UBports
servers with test credentials), so the integration tests, the benchmarks and
``scripts/run-local`` all run the relay exactly the same way.

It is a development tool: ``chatmaild`` and ``notifiers`` never import it, and it
is not installed with them (pyproject lists only the programs' packages).  Run it
from the repository root (``python -m devstack.localstack``, ``python -m bench``;
pytest has ``pythonpath = ["."]``).

Modules, one job each:

* :mod:`devstack.loopback`: free ports on 127.0.0.1, is something listening, polling.
* :mod:`devstack.process`: stopping a child process, reading its log from an offset,
  starting several services and stopping them again (:func:`~devstack.process.running`).
* :mod:`devstack.accounts`: the mail domain and the demo users.
* :mod:`devstack.dovecot`: one Dovecot instance (config rendering, start/stop, log checks).
* :mod:`devstack.metadata`: ``chatmail-metadata`` as a subprocess with a generated ini.
* :mod:`devstack.imap` and :mod:`devstack.lmtp`: the clients.
* :mod:`devstack.turn`: a stand-in for the chatmail-turn credential socket.
* :mod:`devstack.pushsink`: an HTTP server that records the notifier's POSTs.
* :mod:`devstack.relay`: what an integration test gets (all of the above for one test).
* :mod:`devstack.fakes`: fake APNs, FCM and UBports servers and their credentials.
* :mod:`devstack.localstack`: ``scripts/run-local``.
"""
