"""The node lifecycle: one coordinator (core.py, sans-IO) and its runner (runner.py).

Read core.py first: it is where a newcomer learns why a node did what it did.
"""

from .core import (
    Answer,
    Candidate,
    ClearNextOS,
    Coordinator,
    Effect,
    EventWindow,
    NodeLife,
    Record,
    RecordState,
    RecoveryPolicy,
    Remember,
    ResendThenFail,
    SendOrder,
    Stuck,
    Via,
    reply_state,
)
from .runner import Lifecycle, OrderSender

__all__ = ["Answer", "Candidate", "ClearNextOS", "Coordinator", "Effect", "EventWindow",
           "Lifecycle", "NodeLife", "OrderSender", "Record", "RecordState", "RecoveryPolicy",
           "Remember", "ResendThenFail", "SendOrder", "Stuck", "Via", "reply_state"]
