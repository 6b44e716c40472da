"""The backend contract, whole: a model id, one request in and its completion out, a close, and
what the backend says of itself for run.json. It lives, with the values it passes, in
``cai.types`` (the bottom of the package: ``cai.runtime`` needs it too); here for the backends.

``generate`` never raises for one request: a failed call is a ``Completion`` whose ``failure``
says whose fault it was (``request``, ``server``, ``unreachable``), decided where it failed.
Every backend runs on the run's event loop (``cai.runtime``): none owns a thread or a loop.
"""

from __future__ import annotations

from ..types import LATER_FIELDS, Backend, BackendBase, Completion, Failure, Message, Request, Sampling, key_fields

__all__ = ["LATER_FIELDS", "Backend", "BackendBase", "Completion", "Failure", "Message", "Request", "Sampling",
           "key_fields"]
